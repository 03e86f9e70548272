"""
Benchmark: training and sampling speed, memory and MFU of Scale Space Diffusion against its baselines, side by side
in one run on one GPU (SPEC 3 FLOP counts, the real training step of train.py, synthetic images).

    python bench.py --res 64 --levels 4                 # SSD 4L vs the 1-level Flexi-UNet vs the full ADM UNet
    python bench.py --res 256 --levels 6 --sample False --max_batch True

Variants: "ssd" (the Flexi-UNet with L levels), "flexi1" (the same network at one level: SSD's 1L baseline),
"full" (the ADM UNet at full resolution, DDPM-x0) and "msf" (the two-stage MSF baseline of msf.py); a suffix
"-nograph" runs a variant without CUDA graphs and "-cl" in channels-last layout, for before/after comparisons in
the same run. Training time is measured per resolution path and averaged with the share of batches each path gets
under SPEC 2's batch rule; compilation and warm-up are excluded, CUDA is synchronised, and each figure is the median
of several repeats. Memory: "peak GB" is the most allocated at once; with CUDA graphs the recorded paths'
activations live in the graphs' private pool, so "reserved GB" (all memory the process holds) is the figure that
compares. Results go to OUT/bench_<res>px.json and .md.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import msf
from data import ImageData
from ssd import inner_steps, network_denoiser, sample, seeded_noise
from train import DEFAULTS, PEAK_BF16_FLOPS, Trainer, apply_presets, parse_bool

VARIANTS = {"ssd": {}, "flexi1": dict(levels=1), "full": dict(baseline="x0"), "msf": dict(method="msf"),
            "ssdqk": dict(qk_norm=True), "ssdfp32attn": dict(attention_fp32=True), "fullqk": dict(baseline="x0", qk_norm=True)}


class SyntheticTrainer(Trainer):
    """The training loop of train.py on random images: measures compute, not the disk."""

    def load_data(self):
        images = np.random.default_rng(0).integers(0, 256, (1024, self.cfg["res"], self.cfg["res"], 3), np.uint8)
        return ImageData(images, None, 0, "synthetic")


def make_trainer(args, variant):
    name, _, suffix = variant.partition("-")
    if name not in VARIANTS or suffix not in ("", "nograph", "cl"):
        raise SystemExit(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}, optionally with the "
                         f"suffix -nograph or -cl")
    cfg = dict(DEFAULTS, dataset="celeba", res=args.res, levels=args.levels, batch_size=args.batch_size,
               compile=args.compile, channels_last=args.channels_last or suffix == "cl",
               cuda_graphs=suffix != "nograph", out_dir=args.out, seed=0)
    cfg.update(VARIANTS[name])
    return SyntheticTrainer(apply_presets(cfg))


def path_shares(ss):
    """Share of training batches per path under SPEC 2's rule: inner steps of each level, and each transition."""
    shares = {}
    for level, steps in enumerate(inner_steps(ss)):
        if len(steps):
            shares[int(steps[0])] = len(steps) / ss.T
    for t in ss.transitions:
        shares[t] = 1 / ss.T
    return shares  # representative step -> share


def timed(fn, repeats, iters):
    """Median seconds per call of fn over `repeats` runs of `iters` calls, timed with CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / iters)
    return statistics.median(times), times


def bench_training(trainer, args, peak):
    ss, batch = trainer.ss, trainer.cfg["batch_size"]
    start = time.time()
    trainer.compile_all_paths()
    compile_s = time.time() - start
    print(f"  compiled the training paths in {compile_s:.0f} s", flush=True)
    rows, avg_time, avg_flops = [], 0.0, 0.0
    for t, share in path_shares(ss).items():
        steps = torch.full((batch,), t)
        name = trainer.path_name(steps)
        for _ in range(3):  # warm-up: optimizer state, allocator, autotuning
            trainer.train_step(steps)
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = timed(lambda: trainer.train_step(steps), args.repeats, args.iters)
        flops = trainer.step_flops(name)
        rows.append(dict(path=name, share=share, ms=1000 * seconds, images_per_s=batch / seconds,
                         tflops=flops / seconds / 1e12, mfu=flops / seconds / peak,
                         peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30,
                         reserved_gb=torch.cuda.max_memory_reserved() / 2 ** 30))
        print(f"  {name}: {1000 * seconds:.1f} ms/step, {rows[-1]['mfu'] * 100:.1f}% MFU", flush=True)
        avg_time += share * seconds
        avg_flops += share * flops
    return dict(paths=rows, compile_s=compile_s, ms_per_step=1000 * avg_time, images_per_s=batch / avg_time,
                tflops=avg_flops / avg_time / 1e12, mfu=avg_flops / avg_time / peak,
                peak_mem_gb=max(r["peak_mem_gb"] for r in rows), reserved_gb=max(r["reserved_gb"] for r in rows))


def sampler(trainer, n):
    """draw(steps): n images from the variant's network (untrained weights: speed only)."""
    noise = seeded_noise(torch.arange(n, device=trainer.device))
    if trainer.msf:
        return lambda steps: msf.sample(trainer.model, trainer.ss_base, trainer.ss, n, 3, steps, noise=noise)
    denoise = network_denoiser(trainer.model, trainer.ss)
    return lambda steps: sample(denoise, trainer.ss, n, 3, steps=steps, noise=noise)


@torch.no_grad()
def bench_sampling(trainer, args):
    draw = sampler(trainer, args.sample_batch)
    start = time.time()
    draw(4 * trainer.ss.levels)  # compiles every inference path
    torch.cuda.synchronize()
    results = dict(compile_s=time.time() - start)
    for steps in args.sample_steps:
        seconds, _ = timed(lambda: draw(steps), args.sample_repeats, 1)
        results[f"{steps}_steps_s"] = seconds
        print(f"  sampling {args.sample_batch} images, {steps} steps: {seconds:.1f} s", flush=True)
    return results


def largest_batch(trainer, limit=4096):
    """Largest power-of-two per-GPU batch whose most expensive path trains without running out of memory."""
    t = max(path_shares(trainer.ss), key=lambda t: trainer.step_flops(trainer.path_name(torch.tensor([t]))))
    trainer.drop_graphs()  # eager steps: a failed capture is hard to recover from, and the memory is the same
    best, batch = 0, 32
    while batch <= limit:
        trainer.per_rank = trainer.micro = batch
        try:
            trainer.train_step(torch.full((batch,), t))
            torch.cuda.synchronize()
            best, batch = batch, 2 * batch
        except torch.cuda.OutOfMemoryError:
            break
    trainer.opt.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return best


def markdown(results, args):
    lines = [f"### {args.res} px, SSD {args.levels} levels vs baselines — {results['device']}, {results['date']}",
             f"`{results['command']}`", "",
             "| variant | train ms/step | img/s | TFLOP/s | MFU | peak GB | reserved GB | " +
             " | ".join(f"sample {s} steps (s)" for s in args.sample_steps) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(args.sample_steps)]
    for name, r in results["variants"].items():
        tr, sa = r.get("train", {}), r.get("sample", {})
        cells = [f"{tr['ms_per_step']:.1f}", f"{tr['images_per_s']:.0f}", f"{tr['tflops']:.0f}",
                 f"{100 * tr['mfu']:.1f}%", f"{tr['peak_mem_gb']:.1f}", f"{tr['reserved_gb']:.1f}"] if tr else ["-"] * 6
        cells += [f"{sa[f'{s}_steps_s']:.1f}" if sa else "-" for s in args.sample_steps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "ssd" in results["variants"] and "train" in results["variants"]["ssd"]:
        lines += ["", "| SSD path | share of batches | ms/step | img/s | MFU | peak GB | reserved GB |",
                  "|---|---|---|---|---|---|---|"]
        for p in results["variants"]["ssd"]["train"]["paths"]:
            lines.append(f"| {p['path']} | {100 * p['share']:.1f}% | {p['ms']:.1f} | {p['images_per_s']:.0f} | "
                         f"{100 * p['mfu']:.1f}% | {p['peak_mem_gb']:.1f} | {p['reserved_gb']:.1f} |")
    batches = {name: r["max_batch"] for name, r in results["variants"].items() if "max_batch" in r}
    if batches:
        lines += ["", "Largest power-of-two training batch per GPU on the most expensive path: " +
                  ", ".join(f"{name} {b}" for name, b in batches.items())]
    ratios = results.get("ratios", {})
    if ratios:
        lines += [""] + [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--variants", default="ssd,flexi1,full")
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default: the paper's)")
    parser.add_argument("--train", type=parse_bool, default=True)
    parser.add_argument("--sample", type=parse_bool, default=True)
    parser.add_argument("--sample_batch", type=int, default=256)
    parser.add_argument("--sample_steps", default="1000,250", help="comma list of sampling step counts")
    parser.add_argument("--sample_repeats", type=int, default=1)
    parser.add_argument("--max_batch", type=parse_bool, default=False, help="search the largest batch per GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", type=parse_bool, default=True)
    parser.add_argument("--channels_last", type=parse_bool, default=False)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    args.sample_steps = [int(s) for s in args.sample_steps.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("bench.py measures GPU speed: run it on a machine with a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), float("nan"))
    results = dict(device=name, date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv),
                   torch=torch.__version__, peak_flops=peak, variants={})
    for variant in args.variants.split(","):
        print(variant, flush=True)
        trainer = make_trainer(args, variant)
        row = results["variants"][variant] = {}
        if args.train:
            row["train"] = bench_training(trainer, args, peak)
        if args.sample:
            row["sample"] = bench_sampling(trainer, args)
        if args.max_batch:
            row["max_batch"] = largest_batch(trainer)
        del trainer
        torch.cuda.empty_cache()
    v = results["variants"]
    ratios = {}
    for base in [name for name in v if name != "ssd"]:
        if "ssd" in v and base in v:
            if "train" in v["ssd"] and "train" in v[base]:
                ratios[f"training throughput SSD / {base}"] = v["ssd"]["train"]["images_per_s"] / v[base]["train"]["images_per_s"]
            for s in args.sample_steps:
                if "sample" in v["ssd"] and "sample" in v[base]:
                    ratios[f"sampling {s} steps, {base} time / SSD time"] = v[base]["sample"][f"{s}_steps_s"] / v["ssd"]["sample"][f"{s}_steps_s"]
    results["ratios"] = ratios
    stem = os.path.join(args.out, f"bench_{args.res}px")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results, args)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
