"""
Benchmark: training and sampling speed, memory and MFU of Scale Space Diffusion against its baselines, side by side
in one run on one GPU. Training times train.py's own step (train.train_step) on synthetic images.

    python bench.py --res 64 --levels 4                 # SSD 4L vs the 1-level Flexi-UNet vs the full ADM UNet
    python bench.py --res 256 --levels 6 --sample False --max_batch True
    python bench.py --variants ssd,ssd-eager,ssd-paperattn --sample False   # before/after in the same run
    python bench.py --variants ssd,full --sample False --roofline True      # where each path's time goes
    python bench.py --variants ssd --kernel_bandwidth 64->64,8->8           # Inductor's kernels, each alone
    python bench.py --groupnorm True                                        # each GroupNorm form alone, per level

Variants: "ssd" (the Flexi-UNet with L levels), "flexi1" (the same network at one level), "full" (the ADM UNet at full
resolution, DDPM-x0) and "msf" (msf.py), each with optional suffixes that turn one thing off or on: -eager (no
torch.compile), -nograph (no CUDA graphs, in training or sampling), -nchw (training and sampling in the channels-first
layout, not channels-last), -catskip (decoder skips joined by torch.cat, not flexi_unet.JoinSkip), -nativenorm (torch's
GroupNorm compiled, not flexi_unet.GroupNorm's per-channel form), -rowstats (its statistics over 8 blocks of rows, where
the rows allow), -fusedgrads (its backward written out, flexi_unet.GroupNormGrads), -paperattn (the paper's attention,
no QK-norm), -fp32attn (the paper's attention in float32). Training time is measured per path and averaged with the
share of batches each path gets (methods.py); compilation and warm-up are excluded, CUDA is synchronised, and each
figure is the median of several repeats. The GPU's ceilings (a large bf16 matrix product, a large copy) are measured
first; each sampling time comes with its floor, its FLOPs at that ceiling. Memory: "peak GB" is the most allocated at
once; with CUDA graphs the recorded paths' activations live in the graphs' own pool, so "reserved GB" (all the process
holds) is the figure that compares. Results go to OUT/bench_<res>px.json and .md, rewritten after each measurement, so a
run cut short keeps what it finished.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch._inductor.config

import roofline
import sample
import train
from common import markdown_table, parse_bool
from data import ImageData, get_batch
from flexi_unet import GroupNorm, paper_config
from ssd import seeded_noise

VARIANTS = {"ssd": [], "flexi1": ["--levels", "1"], "full": ["--method", "ddpm_x0"], "msf": ["--method", "msf"]}
SUFFIXES = {"eager": ["--compile", "False"], "nograph": ["--cuda_graphs", "False"],
            "nchw": ["--channels_last", "False"], "catskip": ["--dense_skip_grads", "False"],
            "nativenorm": ["--per_channel_norm", "False"], "rowstats": ["--norm_row_blocks", "8"],
            "fusedgrads": ["--norm_fused_grads", "True"], "paperattn": ["--qk_norm", "False"],
            "fp32attn": ["--qk_norm", "False", "--attention_fp32", "True"]}


def variant_config(args, variant, out_dir):
    """train.py's settings for a variant: the paper's model and presets at --res, CelebA-sized synthetic images."""
    name, *suffixes = variant.split("-")
    if name not in VARIANTS or any(s not in SUFFIXES for s in suffixes):
        raise SystemExit(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}, with optional suffixes "
                         f"{', '.join('-' + s for s in SUFFIXES)}")
    argv = ["--dataset", "celeba", "--res", str(args.res), "--out_dir", out_dir, "--log_every", str(10 ** 9)]
    argv += ["--levels", str(args.levels)] if name == "ssd" else []
    argv += ["--batch_size", str(args.batch_size)] if args.batch_size else []
    argv += ["--compile", str(args.compile)] if args.compile is not None else []
    argv += VARIANTS[name] + [flag for s in suffixes for flag in SUFFIXES[s]]
    return train.parse_config(argv)


def synthetic_data(res):
    images = np.random.default_rng(0).integers(0, 256, (1024, res, res, 3), np.uint8)
    return ImageData(images, None, 0, "synthetic")


def bench_training(run, cfg, data, args, peak, ceiling=None):
    """Each path's training step timed; with a ceiling (roofline.ceilings) also its work and kernels by kind."""
    batch = cfg["batch_size"]
    compile_s = train.compile_paths(run, cfg, data)
    print(f"  compiled the training paths in {compile_s:.0f} s", flush=True)
    x0, y = get_batch(data, batch, torch.Generator().manual_seed(0), run.device)
    eager_cfg = eager_config(cfg)
    eager = train.build_run(eager_cfg, data, device=run.device) if ceiling else None
    rows, where, avg_time, avg_flops = [], [], 0.0, 0.0
    for path in run.method.paths:
        t = run.method.path_steps(path, batch)
        step = lambda: train.train_step(run, cfg, x0, t)
        for _ in range(3):  # warm-up: optimizer state, allocator, autotuning
            step()
        torch.cuda.reset_peak_memory_stats()
        seconds = roofline.cuda_seconds(step, args.repeats, args.iters)
        flops = 3e9 * run.method.gflops(run.model, path) * batch  # forward and backward: about 3x the forward
        rows.append(dict(path=path.name, share=path.share, ms=1000 * seconds, images_per_s=batch / seconds,
                         tflops=flops / seconds / 1e12, mfu=flops / seconds / peak,
                         peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30,
                         reserved_gb=torch.cuda.max_memory_reserved() / 2 ** 30))
        print(f"  {path.name}: {1000 * seconds:.1f} ms/step, {rows[-1]['mfu'] * 100:.1f}% MFU", flush=True)
        if ceiling:
            eager_step = lambda: train.train_step(eager, eager_cfg, x0, t)
            eager_step()  # the optimiser's state exists from here on, as in training
            where.append(roofline.row(path.name, flops, roofline.step_work(eager_step, eager.params),
                                      roofline.kernel_times(step), ceiling))
        avg_time += path.share * seconds
        avg_flops += path.share * flops
    return dict(paths=rows, compile_s=compile_s, ms_per_step=1000 * avg_time, images_per_s=batch / avg_time,
                tflops=avg_flops / avg_time / 1e12, mfu=avg_flops / avg_time / peak,
                peak_mem_gb=max(r["peak_mem_gb"] for r in rows), reserved_gb=max(r["reserved_gb"] for r in rows),
                **(dict(roofline=where) if ceiling else {}))


def bench_kernel_bandwidth(run, cfg, data, path_names, ceiling):
    """roofline.inductor_kernels of each named training path: what Inductor's kernels move and how fast, each alone."""
    paths = {path.name: path for path in run.method.paths}
    unknown = [name for name in path_names if name not in paths]
    if unknown:
        raise SystemExit(f"--kernel_bandwidth: no path {', '.join(unknown)} here; choose from {', '.join(paths)}")
    x0, _ = get_batch(data, cfg["batch_size"], torch.Generator().manual_seed(0), run.device)
    rows = []
    for name in path_names:
        t = run.method.path_steps(paths[name], cfg["batch_size"])
        rows.append(dict(path=name, **roofline.inductor_kernels(lambda: train.train_step(run, cfg, x0, t), ceiling[1])))
        print(f"  {name}: Inductor's kernels move {rows[-1]['gb']:.1f} GB in {rows[-1]['ms']:.1f} ms alone, "
              f"{100 * rows[-1]['copy_share']:.0f}% of the copy ceiling", flush=True)
    return rows


# The compiled GroupNorm forms (flexi_unet.GroupNorm's per_channel, row_blocks, fused_grads), each timed alone by
# --groupnorm: torch's, the per-channel default, and the candidates: statistics over 8 blocks of rows, and the
# backward written out with its sums over 1 to 32 blocks (fewer where the rows don't allow as many).
NORM_FORMS = {"torch's": (False, 1, False), "per-channel": (True, 1, False),
              "per-channel, 8 row blocks": (True, 8, False), "per-channel, backward written out": (True, 1, True),
              **{f"per-channel, {n} row blocks, backward written out": (True, n, True) for n in (4, 8, 16, 32)}}
# Inductor picks each kernel's block sizes from a few fixed configurations; with coordinate_descent_tuning it also
# times their neighbours, at the cost of a longer compilation. --groupnorm times the default and the fastest form
# again with it at the full resolution: whether the kernels or their configurations are slow.
TUNINGS = {"fixed": {}, "coordinate descent": {"coordinate_descent_tuning": True}}
# A GroupNorm followed by SiLU, as the network runs it, moves its input's size in bf16 at least 8 times: forward,
# the statistics read it and the output pass reads it and writes the output; backward, the statistics read the
# input and the output's gradient, and the last pass reads both and writes the input's gradient.
NORM_PASSES = 8


def bench_groupnorm(batch, res, levels):
    """Each compiled GroupNorm form alone (NORM_FORMS), then SiLU, forward and backward, on a channels-last bf16
    activation of each level of the paper's model: (batch, the level's width, its resolution squared); at the full
    resolution, the default and the fastest form again with Inductor's coordinate-descent tuning (TUNINGS)."""
    config = paper_config(res, levels)
    rows = []
    for level in range(levels):
        width, side = config.base_channels * config.channel_mult[level], res >> level
        x = torch.randn(batch, width, side, side, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)

        def timed(form, tuning):
            norm = GroupNorm(config.norm_groups, width).cuda()
            norm.per_channel, norm.row_blocks, norm.fused_grads = NORM_FORMS[form]
            seconds = norm_seconds(norm, x, TUNINGS[tuning])
            rows.append(dict(shape=f"{batch} x {width} x {side} x {side}", form=form, tuning=tuning,
                             ms=1000 * seconds, gbs=NORM_PASSES * x.nbytes / seconds / 1e9))
            print(f"  {rows[-1]['shape']}, {form}, {tuning} configurations: {rows[-1]['ms']:.3f} ms", flush=True)
            return seconds

        seconds = {form: timed(form, "fixed") for form in NORM_FORMS}
        if level == 0:  # where most of the GroupNorms' time goes, and tuning times many configurations
            for form in dict.fromkeys(["per-channel", min(seconds, key=seconds.get)]):  # once if they are the same
                timed(form, "coordinate descent")
    return rows


def norm_seconds(norm, x, options):
    """Seconds per forward and backward of norm, then SiLU, compiled with Inductor's options, on x."""
    torch._dynamo.reset()  # each form and shape compiled afresh, never from another's cache entry
    forward = torch.compile(lambda a: torch.nn.functional.silu(norm(a)).to(a.dtype), dynamic=False, options=options)
    grad = torch.randn_like(x)

    def step():
        leaf = x.detach().requires_grad_()
        forward(leaf).backward(grad)

    step()  # compiles, and with coordinate descent tunes
    return roofline.cuda_seconds(step)


def groupnorm_markdown(rows, copy_gbs):
    cells = [[r["shape"], r["form"], r["tuning"], f"{r['ms']:.3f}", f"{r['gbs']:,.0f}",
              f"{100 * r['gbs'] / copy_gbs:.0f}%"] for r in rows]
    return ("Each compiled GroupNorm alone, then SiLU, forward and backward, channels-last bf16; its rate counts the "
            f"{NORM_PASSES} passes over the activation the pair needs at least:\n\n" +
            markdown_table(["activation", "GroupNorm", "Inductor's configurations", "ms", "GB/s",
                            "of the copy ceiling"], cells))


def eager_config(cfg):
    """The variant's settings without compilation or CUDA graphs: every aten operation on its own (roofline.py)."""
    return dict(cfg, compile=False, cuda_graphs=False)


def sampling_chain(run, n, steps, fused_noise=False):
    """n images drawn from the EMA network with `steps` steps, each image's noise seeded by its index."""
    seeds = torch.arange(n, device=run.device)
    return run.method.sample(run.ema, n, steps, noise=seeded_noise(seeds, fused_noise))


@torch.inference_mode()  # as sample.py draws
def bench_sampling(run, cfg, args, peak, ceiling):
    """Sampling time and MFU of args.sample_batch images from the EMA network (untrained weights: speed only),
    compiled and replayed as CUDA graphs as the variant trains (sample.py's defaults), and its floor: the time the
    chain's FLOPs alone would take at the measured matrix-product ceiling, the least that faster kernels could reach."""
    n = args.sample_batch
    seconds = sample.speed_up(run.method, run.ema, n, compile=cfg["compile"], graphs=cfg["cuda_graphs"],
                               channels_last=cfg["channels_last"], per_channel_norm=cfg["per_channel_norm"],
                               norm_row_blocks=cfg["norm_row_blocks"])
    torch.cuda.synchronize()
    results = dict(compile_s=seconds or 0.0)
    for steps in args.sample_steps:
        seconds = roofline.cuda_seconds(lambda: sampling_chain(run, n, steps), args.sample_repeats, 1)
        flops = 1e9 * run.method.sampling_gflops(run.ema, steps) * n
        results[f"{steps}_steps_s"] = seconds
        results[f"{steps}_steps_flops"] = flops
        results[f"{steps}_steps_mfu"] = flops / seconds / peak
        results[f"{steps}_steps_floor_s"] = flops / (1e12 * ceiling[0])
        print(f"  sampling {n} images, {steps} steps: {seconds:.1f} s, "
              f"{100 * results[f'{steps}_steps_mfu']:.1f}% MFU", flush=True)
    if args.fused_noise and cfg["compile"]:  # the first chain again, its noise made by one kernel: before and after
        steps = args.sample_steps[0]
        sampling_chain(run, n, steps, fused_noise=True)  # compiles the noise kernel of each resolution
        results["fused_noise_s"] = roofline.cuda_seconds(lambda: sampling_chain(run, n, steps, fused_noise=True),
                                                         args.sample_repeats, 1)
        print(f"  the same, noise as one kernel (ssd.fused_box_muller): {results['fused_noise_s']:.1f} s", flush=True)
    return results


@torch.inference_mode()
def sampling_roofline(run, args):
    """Where the first chain's time goes: every kernel of one chain under the profiler, summed by kind."""
    chain = lambda: sampling_chain(run, args.sample_batch, args.sample_steps[0])
    measured = roofline.kernel_times(chain, steps=1)
    return dict(kernels_ms=measured["kinds"], wall_ms=measured["wall_ms"], host_ms=measured["host_ms"],
                launches=measured["launches"], heaviest=measured["heaviest"])


def largest_batch(run, cfg, data, limit=4096, granularity=8):
    """Largest per-GPU batch, a multiple of granularity, whose most expensive path trains without running out of
    memory: doubling from 32 to the first batch that fails, then halving the interval between it and the last
    that fitted (64 fits and 128 fails: 96, then 80 or 112, ...)."""
    path = max(run.method.paths, key=lambda p: run.method.gflops(run.model, p))
    if run.graphs is not None:  # eager steps: a failed capture is hard to recover from, and the memory is the same
        run.graphs.clear()
        run.graphs = None

    def fits(batch):
        try:
            x0, _ = get_batch(data, batch, torch.Generator().manual_seed(0), run.device)
            train.train_step(run, dict(cfg, micro_batch=None), x0, run.method.path_steps(path, batch))
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:  # the next try starts from the same memory: no gradients held, the cache given back
            run.opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    best, failed = 0, 32
    while failed <= limit and fits(failed):
        best, failed = failed, 2 * failed
    if failed > limit:
        return best
    while failed - best > granularity:
        middle = (best + failed) // 2 // granularity * granularity
        best, failed = (middle, failed) if fits(middle) else (best, middle)
    return best


def markdown(results, args):
    variants = []
    for name, r in results["variants"].items():
        tr, sa = r.get("train", {}), r.get("sample", {})
        cells = [f"{tr['ms_per_step']:.1f}", f"{tr['images_per_s']:.0f}", f"{tr['tflops']:.0f}",
                 f"{100 * tr['mfu']:.1f}%", f"{tr['peak_mem_gb']:.1f}", f"{tr['reserved_gb']:.1f}"] if tr else ["-"] * 6
        cells += [f"{sa[f'{s}_steps_s']:.1f} ({100 * sa[f'{s}_steps_mfu']:.0f}%)" if sa else "-"
                  for s in args.sample_steps]
        variants.append([name, *cells])
    lines = [f"### {args.res} px, SSD {args.levels} levels vs baselines — {results['device']}, {results['date']}",
             f"`{results['command']}`", "",
             markdown_table(["variant", "train ms/step", "img/s", "TFLOP/s", "MFU", "peak GB", "reserved GB",
                             *(f"sample {s} steps: s (MFU)" for s in args.sample_steps)], variants)]
    for name, r in results["variants"].items():
        if "train" in r:
            lines += ["", markdown_table(
                [f"{name} path", "share of batches", "ms/step", "img/s", "MFU", "peak GB", "reserved GB"],
                [[p["path"], f"{100 * p['share']:.1f}%", f"{p['ms']:.1f}", f"{p['images_per_s']:.0f}",
                  f"{100 * p['mfu']:.1f}%", f"{p['peak_mem_gb']:.1f}", f"{p['reserved_gb']:.1f}"]
                 for p in r["train"]["paths"]])]
    batches = {name: r["max_batch"] for name, r in results["variants"].items() if "max_batch" in r}
    if batches:
        lines += ["", "Largest training batch per GPU on the most expensive path (a multiple of 8): " +
                  ", ".join(f"{name} {b}" for name, b in batches.items())]
    if "groupnorm" in results:
        lines += ["", groupnorm_markdown(results["groupnorm"], results["ceilings"]["copy_gbs"])]
    lines += [""] + [f"- {k}: {v:.2f}x" for k, v in results["ratios"].items()]
    floors = [f"{name} {r['sample'][f'{s}_steps_floor_s']:.2f} s for {s} steps" for name, r in
              results["variants"].items() for s in args.sample_steps if f"{s}_steps_floor_s" in r.get("sample", {})]
    if floors:
        lines += ["", f"Sampling floor, {args.sample_batch} images: the chain's FLOPs at the measured matrix-product "
                      f"ceiling ({results['ceilings']['matmul_tflops']:.0f} TFLOP/s): " + ", ".join(floors)]
    for name, r in results["variants"].items():
        if "fused_noise_s" in r.get("sample", {}):
            lines += ["", f"{name}, sampling {args.sample_batch} images with {args.sample_steps[0]} steps, the noise "
                          f"made by one kernel (ssd.fused_box_muller): {r['sample']['fused_noise_s']:.2f} s, against "
                          f"{r['sample'][f'{args.sample_steps[0]}_steps_s']:.2f} s"]
        if "kernels_ms" in r.get("sample", {}):
            kernels = r["sample"]["kernels_ms"]
            kinds = ", ".join(f"{kind} {ms / 1000:.2f}" for kind, ms in sorted(kernels.items(), key=lambda kv: -kv[1]))
            idle_s = max(0.0, r["sample"]["wall_ms"] - sum(kernels.values())) / 1000
            lines += ["", f"{name}, sampling {args.sample_batch} images with {args.sample_steps[0]} steps: "
                          f"{r['sample']['wall_ms'] / 1000:.2f} s, of which GPU kernels by kind (s): {kinds}; "
                          f"the GPU idle {idle_s:.2f} s, around {r['sample']['launches']:,.0f} kernels; the host "
                          f"issued them in {r['sample']['host_ms'] / 1000:.2f} s"]
            matrix_s = (kernels.get("conv and matmul", 0.0) + kernels.get("attention", 0.0)) / 1e3
            tflops = r["sample"][f"{args.sample_steps[0]}_steps_flops"] / matrix_s / 1e12
            lines += ["", f"Its convolutions, matrix products and attention ran at {tflops:.0f} TFLOP/s: the chain's "
                          f"FLOPs over their kernels' time."]
            heaviest = roofline.heaviest_text(r["sample"]["heaviest"], scale=1e-3)
            if heaviest:
                lines += ["", "The heaviest kernels outside the matrix products and attention (s): " +
                          "; ".join(heaviest)]
        if "kernel_bandwidth" in r:
            lines += ["", roofline.bandwidth_markdown(name, r["kernel_bandwidth"])]
        if "roofline" in r.get("train", {}):
            ceiling = results["ceilings"]["matmul_tflops"], results["ceilings"]["copy_gbs"]
            lines += ["", roofline.markdown(name, r["train"]["roofline"], ceiling)]
    return "\n".join(lines)


def ratios(variants, sample_steps):
    """Each other variant against the first: training throughput, and sampling time."""
    first, *others = variants
    out = {}
    for name in others:
        a, b = variants[first], variants[name]
        if "train" in a and "train" in b:
            out[f"training throughput {first} / {name}"] = a["train"]["images_per_s"] / b["train"]["images_per_s"]
        for s in sample_steps:
            if "sample" in a and "sample" in b:
                out[f"sampling {s} steps, {name} time / {first} time"] = b["sample"][f"{s}_steps_s"] / a["sample"][
                    f"{s}_steps_s"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--variants", default="ssd,flexi1,full", help="comma list; the first is the reference")
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default: the paper's)")
    parser.add_argument("--train", type=parse_bool, default=True)
    parser.add_argument("--sample", type=parse_bool, default=True)
    parser.add_argument("--sample_batch", type=int, default=256)
    parser.add_argument("--sample_steps", default="1000,250", help="comma list of sampling step counts")
    parser.add_argument("--sample_repeats", type=int, default=1)
    parser.add_argument("--max_batch", type=parse_bool, default=False, help="search the largest batch per GPU")
    parser.add_argument("--roofline", type=parse_bool, default=False,
                        help="also each path's FLOPs, bytes, floors and kernel time by kind (roofline.py)")
    parser.add_argument("--fused_noise", type=parse_bool, default=False,
                        help="also time the first sampling chain with its noise made by one kernel (compiled variants)")
    parser.add_argument("--kernel_bandwidth", default="",
                        help="instead of timing: comma list of training paths (64->64,8->8) whose Inductor kernels are "
                             "each timed alone with the bytes they move (roofline.inductor_kernels)")
    parser.add_argument("--groupnorm", type=parse_bool, default=False,
                        help="instead of the variants: each compiled GroupNorm form alone at every level's activation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", type=parse_bool, default=None, help="as train.py: default on CUDA")
    parser.add_argument("--out", default=os.path.join("out", "bench"))
    args = parser.parse_args()
    args.sample_steps = [int(s) for s in args.sample_steps.split(",")]
    args.kernel_bandwidth = [path for path in args.kernel_bandwidth.split(",") if path]
    if args.kernel_bandwidth:  # Inductor's bandwidth mode lists its kernels without running them: no other timing
        args.train = args.sample = args.max_batch = False
        torch._inductor.config.profile_bandwidth = True  # read when a kernel is generated: before any compilation
    if not torch.cuda.is_available():
        raise SystemExit("bench.py measures GPU speed: run it on a machine with a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # as train.py
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in train.PEAK_BF16_FLOPS.items() if k in name), float("nan"))
    results = dict(device=name, date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv),
                   torch=torch.__version__, peak_flops=peak, variants={})
    ceiling = roofline.ceilings(torch.device("cuda"))  # a few seconds, and every figure is read against them
    results["ceilings"] = dict(matmul_tflops=ceiling[0], copy_gbs=ceiling[1])
    print(f"ceilings: bf16 matrix product {ceiling[0]:.0f} TFLOP/s, copy {ceiling[1]:.0f} GB/s", flush=True)
    if args.groupnorm:
        with tempfile.TemporaryDirectory() as out_dir:
            batch = variant_config(args, "ssd", out_dir)["batch_size"]
        results["groupnorm"] = bench_groupnorm(batch, args.res, args.levels)
        print(save(results, args))
        return
    data = synthetic_data(args.res)
    for variant in args.variants.split(","):
        print(variant, flush=True)
        with tempfile.TemporaryDirectory() as out_dir:
            cfg = variant_config(args, variant, out_dir)
            if args.kernel_bandwidth:
                if not cfg["compile"]:
                    raise SystemExit(f"--kernel_bandwidth measures Inductor's kernels: {variant} is not compiled")
                cfg = dict(cfg, cuda_graphs=False)  # Inductor times each kernel alone, which no graph may capture
            run = train.build_run(cfg, data, device=torch.device("cuda"))
            row = results["variants"][variant] = {}
            if args.kernel_bandwidth:
                row["kernel_bandwidth"] = bench_kernel_bandwidth(run, cfg, data, args.kernel_bandwidth, ceiling)
                save(results, args)
            if args.train:
                row["train"] = bench_training(run, cfg, data, args, peak, ceiling if args.roofline else None)
                save(results, args)
            if args.sample:
                row["sample"] = bench_sampling(run, cfg, args, peak, ceiling)
                save(results, args)  # the times are kept even if the profile below runs out of time
                if args.roofline:
                    row["sample"].update(sampling_roofline(run, args))
                    save(results, args)
            if args.max_batch:
                row["max_batch"] = largest_batch(run, cfg, data)
                save(results, args)
        del run
        torch.cuda.empty_cache()
    print(save(results, args))


def save(results, args):
    """Write the results so far to OUT/bench_<res>px.json and .md, and return the table: a run cut short (a time
    limit, an out-of-memory error) keeps every measurement it finished."""
    results["ratios"] = ratios(results["variants"], args.sample_steps)
    stem = os.path.join(args.out, f"bench_{args.res}px")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results, args)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
