"""
How far are the samplers themselves from the data, with a perfect denoiser? (METHOD.md §4)

Fit a Gaussian to the images (their luminance at --res). Its ideal denoiser E[x_0 | x_t] is then known in closed
form and linear, so every sampling step is affine in the state and the fresh noise, and the law of the sampler's
output is Gaussian with a mean and covariance computed exactly, by running the real step code on basis vectors.
What separates that law from the data's is the sampler's own error, which training cannot remove: the plug-in of
x_hat into the posterior as if x_0 were known, and the respacing. The table gives, for each number of levels,
sampling steps and sampler (the ancestral one, or with --samplers ancestral,ddim also the DDIM-style one), without
the uncertainty of x_0 (ssd.draw_x0), with it drawn from the exact error covariance at the transitions or at every
step, and with it drawn from the errors of 1,000 draws at the transitions (as sample.py measures them): the
Frechet distance between the two Gaussians (in pixels, so not comparable with an FID) and the share of the data's
variance the samples keep. --preserve_snr True measures the process that scales the signal at each resolution
change (METHOD.md §1), where a transition takes little from x_hat.

    python sampler_bias.py                                             # Fashion-MNIST (bundled), 16 px
    python sampler_bias.py --dataset celeba --data_dir PATH --res 16   # CelebA's luminance at 16 px
    python sampler_bias.py --dataset celeba --data_dir PATH --res 16 --preserve_snr True
    python sampler_bias.py --dataset celeba --data_dir PATH --res 16 --samplers ancestral,ddim

The same functions drive the samplers' tests on small Gaussian data (tests/test_ssd.py).
"""
import argparse
import itertools
import os

import numpy as np
import torch

import ssd
from common import markdown_table, parse_bool, run_script
from data import load_dataset
from degrade import ScaleSpace
from fid import frechet_distance
from info_analysis import image_covariance
from sample import X0_ERROR_IMAGES
from ssd import ddim_step, sampling_steps

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights of R, G, B


def lmmse_gain(ss, dense, cov, t):
    """The gain G = a C K^T (a^2 K C K^T + sigma^2 I)^-1 of the best estimate of Gaussian x_0 (covariance C) from
    x_t = a K x_0 + sigma eps, K = R_{1:t} (dense[level of t]): E[x_0 | x_t] = m + G (x_t - a K m)."""
    K, a, sigma = dense[ss.level_of(t)], float(ss.a[t]), float(ss.sigma[t])
    return a * cov @ K.T @ torch.linalg.inv(a * a * K @ cov @ K.T + sigma ** 2 * torch.eye(K.shape[0]))


def ideal_denoiser(ss, mean, cov):
    """E[R_{1:t-1} x_0 | x_t] for Gaussian x_0 (one channel): R_{1:t-1} (m + G (x_t - a K m)), G of lmmse_gain.
    The gain is computed once per step."""
    dense = [op.dense() for op in ss.cumulative]
    gains = {}

    def denoise(x_t, t):
        if t not in gains:
            gains.clear()  # a sampler asks for one step at a time
            gains[t] = lmmse_gain(ss, dense, cov, t)
        K, a = dense[ss.level_of(t)], float(ss.a[t])
        x0 = mean + (x_t.flatten(1).double() - a * K @ mean) @ gains[t].T
        r = ss.sizes[ss.target_level(t)]
        return (x0 @ dense[ss.target_level(t)].T).view(-1, 1, r, r).to(x_t.dtype)

    return denoise


def ideal_x0_error(ss, cov, steps=None, at="transitions"):
    """Errors whose second moment is the ideal denoiser's error covariance exactly, for ssd.draw_x0:
    E = R_{1:s} (C - G a K C) R_{1:s}^T (G of lmmse_gain), which does not depend on x_t. With E = V W V^T, the
    n = r^2 errors sqrt(n) V W^(1/2) (as rows) have (1/n) sum_i e_i e_i^T = E."""
    dense = [op.dense() for op in ss.cumulative]
    errors = {}
    for t in ssd.uncertain_steps(ss, steps, at):
        seen = float(ss.a[t]) * lmmse_gain(ss, dense, cov, t) @ dense[ss.level_of(t)]
        out, r = dense[ss.target_level(t)], ss.sizes[ss.target_level(t)]
        w, v = torch.linalg.eigh(out @ (cov - seen @ cov) @ out.T)
        errors[t] = (r * v * w.clamp(min=0).sqrt()).T.reshape(r * r, 1, r, r)
    return errors


def measured_x0_error(ss, cov, n, steps=None, at="transitions", seed=0):
    """What ssd.measure_x0_error keeps from n images of the Gaussian data with the ideal denoiser."""
    draws = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, len(cov), generator=draws, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    r = ss.sizes[0]
    return ssd.measure_x0_error(ideal_denoiser(ss, torch.zeros(len(cov), dtype=torch.float64), cov), ss,
                                [x0.view(n, 1, r, r)], steps, at, draws)


def exact_output_moments(ss, denoise, method="ancestral", steps=None, x0_error=None):
    """The exact mean and covariance of a sampler's output (one channel), without Monte Carlo.

    With a linear denoiser every step is affine in (x_t, xi, zeta): x_s = A x_t + L xi + U zeta + b, zeta the unit
    noise (one value per kept error) of the x_0 uncertainty (ssd.draw_x0) at the steps x0_error has errors.
    Probing the real step code with basis vectors gives A, L, U and b, and the Gaussian moments propagate exactly:
    m <- A m + b, C <- A C A^T + L L^T + U U^T.
    """
    x0_error = x0_error or {}

    def basis(r):
        return torch.eye(r * r, dtype=torch.float64).view(-1, 1, r, r)

    def zeros(n, r):
        return torch.zeros(n, 1, r, r, dtype=torch.float64)

    r = ss.res(ss.T - 1)
    mean, cov = torch.zeros(r * r, dtype=torch.float64), torch.eye(r * r, dtype=torch.float64)
    kept = sampling_steps(ss, steps)
    for t, s in zip(kept, kept[1:] + [None]):
        r_t, r_s = ss.res(t), ss.sizes[ss.target_level(t)]

        def step(x, xi, zeta):
            x_hat = denoise(x, t)
            if t == 0:
                return x_hat.flatten(1)
            if t in x0_error:
                x_hat = ssd.draw_x0(x_hat, x0_error[t], zeta)
            move = ss.p_step(x, x_hat, t, s, xi=xi) if method == "ancestral" else ddim_step(ss, x, x_hat, t, s, xi)
            return move.flatten(1)

        n = len(x0_error[t]) if t in x0_error else 1  # zeta: one unit value per kept error

        def no_zeta(k):
            return torch.zeros(k, n, dtype=torch.float64)

        b = step(zeros(1, r_t), zeros(1, r_s), no_zeta(1))[0]
        A = (step(basis(r_t), zeros(r_t * r_t, r_s), no_zeta(r_t * r_t)) - b).T
        L = (step(zeros(r_s * r_s, r_t), basis(r_s), no_zeta(r_s * r_s)) - b).T
        U = (step(zeros(n, r_t), zeros(n, r_s), torch.eye(n, dtype=torch.float64)) - b).T
        mean, cov = A @ mean + b, A @ cov @ A.T + L @ L.T + U @ U.T
    return mean, cov


def luminance_covariance(images):
    """The covariance of the images' luminance (uint8 NHWC; grey images as they are), in [-1, 1] as in training."""
    if images.shape[-1] == 3:
        images = (np.asarray(images, dtype=np.float64) @ LUMA).round().astype(np.uint8)[..., None]
    return image_covariance(images)


def bias_table(cov, res, levels, steps, gamma=0.5, preserve_snr=False, images=X0_ERROR_IMAGES,
               samplers=("ancestral",)):
    """One row per (levels, steps, sampler, x_0 uncertainty): the Frechet distance to the data's Gaussian and the
    variance kept. The uncertainty is drawn with the exact error covariance at the transitions or at every step,
    and with the errors measured on `images` draws at the transitions, as sample.py measures them. The mean is zero
    throughout (the covariance alone decides the steps' error)."""
    zero = torch.zeros(len(cov), dtype=torch.float64)
    settings = {"none": lambda ss, k: None,
                "transitions": lambda ss, k: ideal_x0_error(ss, cov, k, "transitions"),
                "all": lambda ss, k: ideal_x0_error(ss, cov, k, "all"),
                f"transitions, {images:,} images": lambda ss, k: measured_x0_error(ss, cov, images, k, "transitions")}
    rows = []
    for n_levels in levels:
        ss = ScaleSpace(res, n_levels, gamma=gamma, preserve_snr=preserve_snr)
        denoise = ideal_denoiser(ss, zero, cov)
        for n_steps, sampler, (at, errors_of) in itertools.product(steps, samplers, settings.items()):
            out_mean, out_cov = exact_output_moments(ss, denoise, sampler, n_steps, errors_of(ss, n_steps))
            rows.append(dict(levels=n_levels, transitions=ss.transitions, steps=n_steps, sampler=sampler,
                             x0_uncertainty=at, frechet=frechet_distance(zero, cov, out_mean, out_cov),
                             variance_kept=float(out_cov.trace() / cov.trace())))
    return rows


def markdown(rows, name, res, preserve_snr=False):
    process = ", the signal scaled at each resolution change (preserve_snr)" if preserve_snr else ""
    title = f"Samplers with the ideal denoiser of a Gaussian fitted to {name}'s luminance at {res} px{process}:"
    table = markdown_table(
        ["levels", "transitions", "steps", "sampler", "x_0 uncertainty", "Frechet distance", "variance kept"],
        [[r["levels"], ", ".join(map(str, r["transitions"])) or "-", r["steps"], r["sampler"], r["x0_uncertainty"],
          f"{r['frechet']:.4f}", f"{r['variance_kept']:.3f}"] for r in rows])
    return f"{title}\n\n{table}"


def comma_ints(text):
    return [int(v) for v in text.split(",")]


def comma_samplers(text):
    samplers = text.split(",")
    unknown = set(samplers) - set(ssd.SAMPLERS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sampler {min(unknown)!r}: choose {' or '.join(ssd.SAMPLERS)}")
    return samplers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "celeba"])
    p.add_argument("--data_dir", help="dataset folder (default: the bundled Fashion-MNIST)")
    p.add_argument("--cache_dir", help="prepared images (default: cache/ beside the data)")
    p.add_argument("--res", type=int, default=16, help="resolution of the Gaussian fit (32 px takes minutes)")
    p.add_argument("--levels", type=comma_ints, default=[1, 2, 3, 4], help="comma list of level counts")
    p.add_argument("--steps", type=comma_ints, default=[100, 1000], help="comma list of sampling steps")
    p.add_argument("--samplers", type=comma_samplers, default=["ancestral"], help="comma list: ancestral, ddim")
    p.add_argument("--gamma", type=float, default=0.5, help="ConvexDecay gamma of the level schedule")
    p.add_argument("--preserve_snr", type=parse_bool, default=False,
                   help="scale the signal at each resolution change (METHOD.md §1)")
    p.add_argument("--out", default="out", help="folder for sampler_bias.md")
    args = p.parse_args(argv)
    if max(args.levels) > args.res.bit_length() - 1 or min(args.levels) < 1:
        p.error(f"--levels {args.levels}: {args.res} px has levels 1 to {args.res.bit_length() - 1}")
    data = load_dataset(args.dataset, args.res, data_dir=args.data_dir, cache_dir=args.cache_dir)
    cov = luminance_covariance(data.images)
    rows = bias_table(cov, args.res, args.levels, args.steps, args.gamma, args.preserve_snr, samplers=args.samplers)
    text = markdown(rows, args.dataset, args.res, args.preserve_snr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sampler_bias.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    run_script(main)
