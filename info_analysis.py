"""
How much of the clean image does each state of the forward process still hold? (paper Sec. 3.2, Fig. 2;
METHOD.md §6)

1. The paper's proxy. Info(t) = P(|sigma_t eps| <= |a_t x_0|) for x_0 ~ U(-1, 1) per pixel (degrade.py has the
   closed form), against Info(r) = r^2 for an image at normalised resolution r. Info(t) = 4^-k marks the step at
   which the noisy full-resolution image holds as much as the 1/2^k image; ConvexDecay 0.5 switches later.

2. Beyond the paper, the same question measured on real images. Fit a Gaussian (mean, covariance C) to the images
   and ask how much of x_0 the best linear (LMMSE) estimate recovers, as the explained variance
   EV = 1 - E|x_0 - x_hat|^2 / tr C, from
       x_t = a_t x_0 + sigma_t eps       (the diffusion state)  and from
       R_k x_0                           (the clean image at 1/2^k resolution, R_k the method's own operator).
   Both are the one closed form below (y = a R x_0 + sigma eps with R = I, or a = 1, sigma = 0), so they are
   measured the same way. The information-matched transition of level k is the first t with
   EV(x_t) <= EV(R_k x_0): the data's version of the proxy's Info(t) = 4^-k. (LMMSE is the best estimator only
   for Gaussian data; on real images a nonlinear denoiser recovers more, so these are linear-estimator numbers.)
   Also reported: the EV and the mutual information in bits of the state SSD actually uses,
   a_t R_k x_0 + sigma_t eps, just before and after each switch.

The information-matched transitions are analysis, not a schedule to train with: CelebA's (48, 188, 395) trained
far worse than the default schedule (see PARITY_CAVEAT).

    python info_analysis.py                                            # Fashion-MNIST (bundled), 32 px
    python info_analysis.py --dataset celeba --data_dir path/to/celeba # a folder holding img_align_celeba/
    python info_analysis.py --out assets                               # the figures of the README

Figures go to out/ unless --out names another folder.
"""
import argparse
import os

import matplotlib

matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch

from data import load_dataset
from degrade import LEVEL_SHAPES, ScaleSpace, information_proxy, level_transitions, make_alphas_cumprod

T = 1000
MAX_LEVELS = 6  # the paper's deepest ladder (256 px down to 8 px)
PAPER_INFO = {0: 0.992, 100: 0.727, 200: 0.478, 300: 0.305, 437: 0.160, 555: 0.085, 750: 0.023, 999: 0.0025}  # Fig. 2a
# Printed with every information-matched schedule: the one training comparison made with such a schedule.
PARITY_CAVEAT = ("Measured: CelebA's information-parity transitions (48, 188, 395; 64 px, 4 levels) trained far worse "
                 "than the default schedule in a 4-minute run on one H200: FID 350.6 against 61.0, same protocol.")
LEVEL_COLORS = plt.cm.viridis(np.linspace(0, 0.9, MAX_LEVELS))


def first_crossing(curve, value):
    """The first step t at which a decreasing curve has dropped to `value` or below; None if it never does."""
    below = torch.nonzero(curve <= value).flatten()
    return int(below[0]) if len(below) else None


def proxy_crossings(noise="linear"):
    """Steps where Info(t) drops to 4^-k = Info(r = 1/2^k), k = 1..MAX_LEVELS-1 (None where it never does)."""
    info = information_proxy(make_alphas_cumprod(T, noise))
    return [first_crossing(info, 4.0 ** -k) for k in range(1, MAX_LEVELS)]


def resolution_label(k):
    """Level k's resolution as a fraction of the full one."""
    return "full" if k == 0 else f"1/{2 ** k}"


# -----------------------------------------------------------------------------
# Gaussian model of the images and closed-form recoverability


def image_covariance(images):
    """Covariance of uint8 (N, H, W, C) images scaled to [-1, 1] as in training, flattened as (C, H, W), float64."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).reshape(len(images), -1).double() / 127.5 - 1
    x = x - x.mean(dim=0)
    return x.T @ x / (len(x) - 1)


def level_spectrum(cov, R, shape):
    """(lam, g) that make every quantity below a sum over eigen-directions of R C R^T = U diag(lam) U^T.

    g_i = |u_i^T R C|^2. shape = (C, H, W) of one image; R acts per channel. Directions with lam ~ 0 carry no
    variance and are dropped (the upsampled 28 px Fashion-MNIST, for one, has a rank-deficient C).
    """
    d = cov.shape[0]
    if R.in_size == R.out_size:  # R = I: u_i^T C = lam_i u_i^T, so g = lam^2 and the costly eigenvectors are not needed
        lam = torch.linalg.eigvalsh(cov)
        g = lam ** 2
    else:
        rc = R(cov.view(d, *shape)).reshape(d, -1).T  # R applied to every row of the symmetric C: (C R^T)^T = R C
        lam, u = torch.linalg.eigh(R(rc.reshape(-1, *shape)).reshape(len(rc), -1))  # R C R^T
        g = ((u.T @ rc) ** 2).sum(dim=1)
    keep = lam > 1e-10 * lam.max()
    return lam[keep], g[keep]


def explained_variance(spectrum, total, signal=1.0, noise=0.0):
    """Fraction of tr C recovered by the LMMSE estimate of x_0 from y = a R x_0 + sigma eps (signal a^2, noise sigma^2).

    Cov(x_0, y) = a C R^T and Cov(y) = a^2 R C R^T + sigma^2 I, so the explained part is
    tr(Cov(x_0, y) Cov(y)^-1 Cov(y, x_0)) = sum_i a^2 g_i / (a^2 lam_i + sigma^2). signal, noise: floats or (T,).
    """
    lam, g = spectrum
    signal = torch.as_tensor(signal, dtype=lam.dtype)[..., None]
    noise = torch.as_tensor(noise, dtype=lam.dtype)[..., None]
    return (signal * g / (signal * lam + noise)).sum(dim=-1) / total


def mutual_information_bits(spectrum, abar):
    """I(x_0; a R x_0 + sigma eps) = 1/2 log2 det(I + a^2/sigma^2 R C R^T) for Gaussian x_0, per step (abar: (T,))."""
    lam, _ = spectrum
    return 0.5 * torch.log2(1 + (abar / (1 - abar))[:, None] * lam).sum(dim=-1)


def psnr(ev, total, pixels):
    """PSNR (dB, peak-to-peak 2 for images in [-1, 1]) of a reconstruction with explained variance ev."""
    return 10 * torch.log10(4 / (total * (1 - ev) / pixels))


def measure(cov, shape, levels, op="bilinear", noise="linear"):
    """Recoverability of x_0 ~ N(mean, cov) on every rung of the ladder, with the operators and schedule of ScaleSpace.

    shape = (C, H, W) of one image. Returns sizes, clean (EV from R_k x_0, per level k), state (EV from
    a_t R_k x_0 + sigma_t eps, (levels, T)), bits (mutual information of that state, (levels, T)) and psnr (of the
    reconstruction from R_k x_0, per level).
    """
    total = cov.trace()
    space = ScaleSpace(shape[-1], levels, T=T, op=op, noise=noise)
    spectra = [level_spectrum(cov, R, shape) for R in space.cumulative]
    clean = torch.stack([explained_variance(s, total) for s in spectra])
    return dict(
        sizes=space.sizes, clean=clean,
        state=torch.stack([explained_variance(s, total, space.abar, 1 - space.abar) for s in spectra]),
        bits=torch.stack([mutual_information_bits(s, space.abar) for s in spectra]),
        psnr=psnr(clean, total, cov.shape[0]))


def matched_transitions(result):
    """Level k starts at the first t where the full-resolution x_t explains no more than the clean R_k x_0 does."""
    return [first_crossing(result["state"][0], ev) for ev in result["clean"][1:]]


# -----------------------------------------------------------------------------
# Figures


def draw_ladders(ax, rows):
    """One bar per (label, transitions): each level's steps coloured by its resolution."""
    for i, (label, transitions) in enumerate(rows):
        bounds = [0] + list(transitions) + [T]
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            ax.broken_barh([(a, b - a)], (i - 0.38, 0.76), color=LEVEL_COLORS[k])
            if b - a > 40:
                ax.text((a + b) / 2, i, resolution_label(k), ha="center", va="center", fontsize=7,
                        color="white" if k < 3 else "black")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, T)
    ax.set_xlabel("diffusion step t")


def plot_proxy(path):
    """Paper Fig. 2a and 2b on one information axis, with the crossings and the ConvexDecay 0.5 ladders."""
    steps = np.arange(T)
    info = {kind: information_proxy(make_alphas_cumprod(T, kind)).numpy() for kind in ("linear", "cosine")}
    crossings = proxy_crossings("linear")
    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 1], height_ratios=[3, 1.5], wspace=0.04, hspace=0.28)
    ax_t = fig.add_subplot(grid[0, 0])
    ax_r = fig.add_subplot(grid[0, 1], sharey=ax_t)
    ax_l = fig.add_subplot(grid[1, 0], sharex=ax_t)

    ax_t.semilogy(steps, info["linear"], lw=2, label="Info(t), linear betas (paper)")
    ax_t.semilogy(steps, info["cosine"], lw=1.5, ls="--", label="Info(t), cosine schedule")
    for k, t in enumerate(crossings, start=1):
        for ax in (ax_t, ax_r):
            ax.axhline(4.0 ** -k, color="grey", lw=0.7, ls=":")
        if t is not None:
            ax_t.plot(t, info["linear"][t], "o", color="C3", zorder=3)
            ax_t.annotate(f"t = {t}", (t, info["linear"][t]), xytext=(-6, -6), textcoords="offset points",
                          ha="right", va="top", color="C3")
            ax_l.axvline(t, color="C3", lw=1, ls=":")
    ax_t.plot([], [], "o", color="C3", label="Info(t) = 4^-k: as informative as the 1/2^k image")
    ax_t.set_ylim(1e-3, 1.2)
    ax_t.set_ylabel("information: fraction of signal-dominated pixels")
    ax_t.set_title("Information proxy (paper Fig. 2): noisy full-resolution x_t vs clean low resolution")
    ax_t.legend(loc="lower left", fontsize=8)
    ax_t.grid(alpha=0.3)
    plt.setp(ax_t.get_xticklabels(), visible=False)

    r = np.geomspace(1 / 40, 1, 200)
    ax_r.semilogy(r, r ** 2, color="k", lw=2, label="Info(r) = r^2")
    ax_r.set_xscale("log", base=2)
    rungs = 2.0 ** -np.arange(MAX_LEVELS)
    ax_r.plot(rungs, rungs ** 2, "s", color="k")
    ax_r.set_xticks(rungs, [resolution_label(k) for k in range(MAX_LEVELS)], fontsize=8)
    ax_r.set_xlabel("normalised resolution r")
    ax_r.set_title("Fig. 2b: scale space", fontsize=10)
    ax_r.legend(loc="lower right", fontsize=8)
    ax_r.grid(alpha=0.3)
    plt.setp(ax_r.get_yticklabels(), visible=False)
    right = ax_r.secondary_yaxis("right", functions=(np.sqrt, np.square))
    right.set_yticks(rungs, [resolution_label(k) for k in range(MAX_LEVELS)])
    right.set_ylabel("resolution r with r^2 = information")

    draw_ladders(ax_l, [(f"ConvexDecay 0.5, {L}L", level_transitions(L)) for L in range(2, MAX_LEVELS + 1)]
                 + [(f"info (proxy), {L}L", crossings[:L - 1]) for L in (4, 5)])
    ax_l.set_title("Level schedules: resolution of x_t at each step", fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_empirical(path, result, name, noise):
    """EV and bits of every rung's state against t, the clean rungs' EV, the matched steps, and three 4L ladders."""
    steps = np.arange(T)
    levels = len(result["sizes"])
    matched = matched_transitions(result)
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.2], hspace=0.3, wspace=0.2)
    ax_ev, ax_bits = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_l = fig.add_subplot(grid[1, :])

    for k in range(levels):
        label = f"{result['sizes'][k]} px ({resolution_label(k)})"
        ax_ev.plot(steps, result["state"][k], color=LEVEL_COLORS[k], lw=2 if k == 0 else 1.2)
        ax_bits.semilogy(steps, result["bits"][k], color=LEVEL_COLORS[k], lw=2 if k == 0 else 1.2, label=label)
    for k in range(1, levels):
        ev = float(result["clean"][k])
        ax_ev.axhline(ev, color=LEVEL_COLORS[k], ls="--", lw=1)
        ax_ev.plot(matched[k - 1], ev, "o", color="C3", zorder=3)
        ax_ev.annotate(f"{matched[k - 1]}", (matched[k - 1], ev), xytext=(5, 4), textcoords="offset points",
                       color="C3", fontsize=9)
    ax_ev.plot([], [], "k--", lw=1, label="clean R x_0 (no noise)")
    ax_ev.plot([], [], "o", color="C3", label="matched t: full-res x_t\nas good as clean R x_0")
    ax_ev.plot(steps, information_proxy(make_alphas_cumprod(T, noise)), color="grey", ls=":", label="proxy Info(t)")
    ax_ev.set_xlabel("diffusion step t")
    ax_ev.set_ylabel("explained variance of x_0 (LMMSE)")
    ax_ev.set_title("How much of x_0 is linearly recoverable from a_t R x_0 + sigma_t eps", fontsize=10)
    ax_ev.legend(fontsize=7, loc="center right", bbox_to_anchor=(1, 0.6), title="solid: state (colours as right)",
                 title_fontsize=7)
    ax_ev.grid(alpha=0.3)

    ax_bits.set_ylim(1e-2, None)
    ax_bits.set_xlabel("diffusion step t")
    ax_bits.set_ylabel("I(x_0; state) in bits (Gaussian model)")
    ax_bits.set_title("Mutual information of the state a_t R x_0 + sigma_t eps", fontsize=10)
    ax_bits.legend(fontsize=7, title="state at", title_fontsize=7)
    ax_bits.grid(alpha=0.3)

    L = min(4, levels)
    draw_ladders(ax_l, [(f"ConvexDecay 0.5, {L}L", level_transitions(L)),
                        (f"info (proxy), {L}L", proxy_crossings(noise)[:L - 1]),
                        (f"matched on {name}, {L}L", matched[:L - 1])])
    fig.suptitle(f"Information in real images ({name}, {result['sizes'][0]} px, Gaussian model)")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------
# Tables


def show(t):
    return "never" if t is None else str(t)


def print_proxy_tables():
    info = information_proxy(make_alphas_cumprod(T, "linear"))
    print("Info(t), linear betas, T = 1000 (paper Fig. 2a)")
    print(f"  {'t':>4} {'Info(t)':>8} {'paper':>7}")
    for t, paper in PAPER_INFO.items():
        print(f"  {t:>4} {float(info[t]):>8.4f} {paper:>7}")
    print("\nInfo(t) = 4^-k = Info(r) at r = 1/2^k (level k of the proxy's information-matched schedule)")
    print(f"  {'k':>2} {'r':>5} {'4^-k':>8} {'linear':>7} {'cosine':>7}")
    for k, (lin, cos) in enumerate(zip(proxy_crossings("linear"), proxy_crossings("cosine")), start=1):
        print(f"  {k:>2} {resolution_label(k):>5} {4.0 ** -k:>8.5f} {show(lin):>7} {show(cos):>7}")


def print_schedule_table(matched, noise):
    """Transitions of every level schedule of degrade.py, the proxy's and the data's, for 2..6 levels."""
    crossings = proxy_crossings(noise)
    names = [name + (" 0.5" if name == "convex" else "") for name in LEVEL_SHAPES] + ["info (proxy)", "data"]
    print(f"\nTransition steps for L levels ({noise} betas; data = matched on the images, see below)")
    print(f"  {'L':>2} " + " ".join(f"{name:<26}" for name in names))
    for L in range(2, MAX_LEVELS + 1):
        cells = [level_transitions(L, T, name, noise=noise) for name in LEVEL_SHAPES]
        for steps in (crossings[:L - 1], matched[:L - 1]):
            cells.append(steps if len(steps) == L - 1 and None not in steps else "-")
        print(f"  {L:>2} " + " ".join(f"{str(c):<26}" for c in cells))


def print_empirical_tables(result, matched, noise):
    sizes, crossings = result["sizes"], proxy_crossings(noise)
    print(f"\nRecoverability of x_0 (LMMSE under a Gaussian fit of the images at {sizes[0]} px)")
    print(f"  {'k':>2} {'res':>5} {'EV from R_k x_0':>16} {'PSNR dB':>8} {'matched t':>10} {'proxy t':>8}")
    for k in range(1, len(sizes)):
        print(f"  {k:>2} {sizes[k]:>5} {float(result['clean'][k]):>16.4f} {float(result['psnr'][k]):>8.2f} "
              f"{show(matched[k - 1]):>10} {show(crossings[k - 1]):>8}")
    L = min(4, len(sizes))
    print(f"\nWhat the switches of each {L}L schedule cost: the state a_t R x_0 + sigma_t eps, level k-1 -> k at step t")
    print(f"  {'schedule':<16} {'k':>2} {'t':>4} {'EV before':>10} {'EV after':>9} {'bits before':>12} {'bits after':>11}")
    for name, steps in (("ConvexDecay 0.5", level_transitions(L, T, noise=noise)),
                        ("info (proxy)", crossings[:L - 1]), ("matched (data)", matched[:L - 1])):
        for k, t in enumerate(steps, start=1):
            ev, bits = result["state"][k - 1:k + 1, t].tolist(), result["bits"][k - 1:k + 1, t].tolist()
            print(f"  {name:<16} {k:>2} {t:>4} {ev[0]:>10.3g} {ev[1]:>9.3g} {bits[0]:>12.3g} {bits[1]:>11.3g}")


def print_parity_schedule(matched, args, levels):
    """The data's information-matched transitions for a 4-level ladder, as analysis: with the measured caveat, and
    the complete command that repeats the comparison behind it."""
    L = min(4, levels)
    steps = matched[:L - 1]
    print(f"\nInformation-parity transitions matched on {args.dataset} at {args.res} px, {L} levels: "
          f"{', '.join(map(show, steps))} (analysis, not a recommended schedule)")
    print(f"  {PARITY_CAVEAT}")
    if None in steps:
        return
    data_dir = "" if args.dataset == "fashion_mnist" and args.data_dir is None else " --data_dir PATH"
    print(f"  To compare such a schedule with the default one, train both, e.g.\n"
          f"  python train.py --dataset {args.dataset}{data_dir} --res {args.res} --levels {L} "
          f"--transitions {','.join(map(str, steps))}" + ("   # PATH: the data folder" if data_dir else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "celeba"])
    parser.add_argument("--data_dir", default=None, help="dataset folder (default: the bundled Fashion-MNIST)")
    parser.add_argument("--cache_dir", default=None, help="prepared images (default: cache/ beside the data)")
    parser.add_argument("--res", type=int, default=32, help="resolution of the Gaussian fit (a power of two)")
    parser.add_argument("--images", type=int, default=10000, help="at most this many images for the fit")
    parser.add_argument("--op", default="bilinear", choices=["bilinear", "box"], help="downsampling operator")
    parser.add_argument("--noise", default="linear", choices=["linear", "cosine"], help="noise schedule")
    parser.add_argument("--out", default="out", help="folder for the figures (default: out/)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    print_proxy_tables()
    plot_proxy(os.path.join(args.out, "info_proxy.png"))

    data = load_dataset(args.dataset, args.res, data_dir=args.data_dir, cache_dir=args.cache_dir)
    pick = np.sort(np.random.default_rng(0).permutation(len(data))[:args.images])  # sorted: sequential memmap reads
    levels = min(MAX_LEVELS, args.res.bit_length())  # down to 1 px at most
    images = data.images[pick]
    shape = (images.shape[3], args.res, args.res)
    result = measure(image_covariance(images), shape, levels, args.op, args.noise)
    matched = matched_transitions(result)
    print_schedule_table(matched, args.noise)
    print_empirical_tables(result, matched, args.noise)
    plot_empirical(os.path.join(args.out, f"info_empirical_{args.dataset}.png"), result, args.dataset, args.noise)

    print_parity_schedule(matched, args, levels)
    print(f"\nFigures: {os.path.join(args.out, 'info_proxy.png')}, "
          f"{os.path.join(args.out, f'info_empirical_{args.dataset}.png')}")


if __name__ == "__main__":
    main()
