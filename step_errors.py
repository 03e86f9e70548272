"""
The network's error in x_0 at each step, for models of different processes measured alike: in the first model's
target space, R_{1:t-1} x_0 at r(t-1) (METHOD.md §3), on the same training images.

    python step_errors.py runs/ssd4_s0/ckpt.pt runs/ddpm_s0/ckpt.pt --n 500
    python step_errors.py runs/ssd4_s0/ckpt.pt runs/ssd4snr_s0/ckpt.pt runs/ddpm_s0/ckpt.pt --every 25

Each model draws x_t from its own forward process at step t and predicts the clean image as its sampler would
(clamped to [-1, 1]); a prediction at full resolution (DDPM's) is resized down with the first model's operator.
So every model answers one question: how well does it know the image at the scale the first model keeps at that
step. Below SSD's first resolution change the processes are one and the errors compare the networks; above it they
also compare what each process's x_t still holds: SSD resizes the image before the noise, so at a resolution change
the noise is not averaged down with the image and the low frequencies lose SNR (METHOD.md §1), where DDPM's x_t,
resized, keeps it. Steps: every --every steps, each resolution change of the first model, and the step --after
steps above each, where that loss shows most.
"""
import argparse
import json
import os

import torch

import ssd
from common import markdown_table, pick_device, run_script
from data import from_uint8_images, load_dataset, spread_indices
from sample import load_model


def chosen_steps(ss, every, after):
    """Every `every` steps, from every/2 up, with each resolution change and the step `after` above it."""
    steps = set(range(every // 2, ss.T, every)) | set(ss.transitions)
    steps |= {t + after for t in ss.transitions if t + after < ss.T}
    return sorted(steps)


def step_errors(denoise, ss, images, steps, target_ss, batch_size, device, seed=0):
    """{t: mean squared error of denoise(x_t, t) against R_{1:t-1} x_0 of target_ss} over `images` (NCHW, full
    resolution), x_t drawn from ss's forward process; a full-resolution prediction is resized down with target_ss's
    operator. The noise comes from `seed`, so two denoisers of one process see the same x_t."""
    generator = torch.Generator(device).manual_seed(seed)
    full = target_ss.sizes[0]
    sums = dict.fromkeys(steps, 0.0)
    with torch.inference_mode():
        for x0 in images.split(batch_size):
            x0 = x0.to(device)
            for t in steps:
                r = ss.res(t)
                noise = torch.randn(x0.shape[0], x0.shape[1], r, r, generator=generator, device=device, dtype=x0.dtype)
                x_hat = denoise(ss.q_sample(x0, t, noise), t)
                target = target_ss.target(x0, t)
                if x_hat.shape[-1] != target.shape[-1] and x_hat.shape[-1] == full:  # DDPM's: resized as SSD's
                    x_hat = target_ss.degrade(x_hat, target_ss.target_level(t))
                if x_hat.shape != target.shape:
                    raise ValueError(f"at step {t} this model predicts {x_hat.shape[-1]} px and the first model "
                                     f"{target.shape[-1]} px: compare models whose ladders agree, or one at full "
                                     "resolution (DDPM)")
                sums[t] += float((x_hat - target).square().sum())
    count = images.shape[0] * images.shape[1]
    return {t: sums[t] / (count * target_ss.sizes[target_ss.target_level(t)] ** 2) for t in steps}


def check_comparable(models, paths):
    first = models[0][0]
    for (method, _, _), path in zip(models[1:], paths[1:]):
        if (method.ss.T, method.ss.sizes[0], method.channels) != (first.ss.T, first.ss.sizes[0], first.channels):
            raise ValueError(f"{path} does not share T, resolution and channels with {paths[0]}: compare models of "
                             "one dataset and resolution")
        if method.num_classes or first.num_classes:
            raise ValueError("step_errors.py measures unconditional models; give checkpoints trained without "
                             "--class_cond")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="checkpoints or snapshots of train.py; the first sets the target space")
    p.add_argument("--n", type=int, default=500, help="training images, spread over the dataset")
    p.add_argument("--every", type=int, default=50, help="steps between measured steps")
    p.add_argument("--after", type=int, default=20, help="also the step this far above each resolution change")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--data_dir", help="the training data (default: the first checkpoint's own)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.path.join("out", "step_errors"), help="folder for step_errors.md and .json")
    args = p.parse_args(argv)
    if args.n < 1 or args.every < 1 or args.after < 1:
        p.error("--n, --every and --after must be at least 1")
    device = pick_device(args.device)
    models = [load_model(path, device) for path in args.ckpts]
    check_comparable(models, args.ckpts)
    first = models[0][0]
    cfg = models[0][2]["config"]
    data = load_dataset(cfg["dataset"], cfg["res"], args.data_dir or cfg["data_dir"], cfg["cache_dir"])
    images = from_uint8_images(torch.from_numpy(data.images[spread_indices(len(data), args.n)]))
    steps = chosen_steps(first.ss, args.every, args.after)
    errors = [step_errors(ssd.network_denoiser(net, method.ss, None, 1.0, method.parameterisation), method.ss, images,
                          steps, first.ss, args.batch_size, device) for method, net, _ in models]

    header = ["step", "x_t of the first model", *args.ckpts, *(f"{path} / first" for path in args.ckpts[1:])]
    rows = [[t, f"{first.ss.res(t)} px" + (" (resolution change)" if t in first.ss.transitions else ""),
             *(f"{e[t]:.5f}" for e in errors), *(f"{e[t] / errors[0][t]:.3f}" for e in errors[1:])] for t in steps]
    text = markdown_table(header, rows) + (f"\n\nMean squared error of x_0 in the first model's target space, "
                                           f"{len(images):,} training images, one noise draw each.")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step_errors.json"), "w") as f:
        json.dump(dict(ckpts=args.ckpts, n=len(images), steps=steps, transitions=first.ss.transitions,
                       errors=[{str(t): e[t] for t in steps} for e in errors]), f, indent=1)
    with open(os.path.join(args.out, "step_errors.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    run_script(main)
