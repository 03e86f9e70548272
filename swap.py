"""
Where a model's samples lose: draw with one model's network above a step and another model's below it, and score
every combination with FID.

    python swap.py runs/ssd4_s0/ckpt.pt runs/ddpm_s0/ckpt.pt --n 2000 --steps 100 --data_dir PATH --max_ref 6000

Below SSD's first resolution change (t < 438 at four levels, METHOD.md §1) its forward process is DDPM's at full
resolution: the same x_t given x_0, the same posterior. So a chain may run one model's levels down to that step
and hand its x_t on to the other model's network (METHOD.md §4, swapped chains). With an SSD model A and a DDPM
model B, the four chains A|A, A|B, B|A, B|B (above|below) separate the steps that make the layout, at low
resolution, from the full-resolution steps that make the detail: if A|B scores near B|B, A's coarse levels are as
good as B's steps above 438, and what A loses, it loses below. Two models of one process (SSD with and without
--flexi, or with two seeds) share every step, and --at may then name any steps, for example each resolution
change, to find the level where one model loses (each model's own chain is drawn once, then two per step):

    python swap.py runs/ssd4_s1/ckpt.pt runs/ssd4full_s1/ckpt.pt --at 438,750,937 --n 2000 --steps 100 --max_ref 6000

A chain keeps the sampling steps and the noise of the model above the swap, so A|A is exactly A's own samples and
A|B starts its lower part from the very x_t that A|A does (images 0 .. n-1 from fixed per-image seeds, as
curves.py draws them). Each combination is scored against the same reference statistics, with the floor (n
training images) alongside.
"""
import argparse
import itertools
import json
import os

import torch

import curves
import fid
import sample
import ssd
from common import markdown_table, pick_device, run_script
from data import load_dataset, to_uint8_images


def shared_steps(a, b):
    """How many steps, from t = 0 up, two forward processes of one T share: x_t of the same size, made by the same
    operator R_{1:t} (the same ladder of sizes and resize), with the same a_t and sigma_t. Below that step the two
    chains are one, and either model's network may draw them."""
    n = min(a.T, b.T)
    same_operator = torch.tensor([a.sizes[:la + 1] == b.sizes[:lb + 1] and (la == 0 or a.op == b.op)
                                  for la, lb in zip(a.level[:n].tolist(), b.level[:n].tolist())])
    same = (same_operator & torch.isclose(a.a[:n], b.a[:n], rtol=1e-9, atol=0)
            & torch.isclose(a.sigma[:n], b.sigma[:n], rtol=1e-9, atol=0))
    return n if same.all() else int(same.logical_not().nonzero()[0])


def swap_step(above, below):
    """The default hand-over: the first resolution change of either process (the step that splits SSD's layout
    from its detail), or where the steps the two share end, if that comes first."""
    first_changes = [m.ss.transitions[0] for m in (above, below) if m.ss.levels > 1]
    return min(first_changes + [shared_steps(above.ss, below.ss)])


def check_swappable(above, below, at):
    """Refuse a swap at `at` unless the two forward processes agree on every step below it."""
    if {above.name, below.name} - {"ssd", "ddpm_x0", "ddpm_eps"}:
        raise ValueError(f"swap.py swaps the chains of ssd and ddpm models, and got {above.name} and {below.name}")
    a, b = above.ss, below.ss
    if (a.T, a.sizes[0], above.channels) != (b.T, b.sizes[0], below.channels):
        raise ValueError(f"the two models do not share T, resolution and channels ({a.T}, {a.sizes[0]} px, "
                         f"{above.channels}; {b.T}, {b.sizes[0]} px, {below.channels}): swap models of one dataset")
    if above.num_classes or below.num_classes:
        raise ValueError("swap.py draws unconditional samples; give checkpoints trained without --class_cond")
    shared = shared_steps(a, b)
    if shared == 0:  # at t = 0 both are at full resolution: only a_0, sigma_0 can differ
        raise ValueError("the two noise schedules differ (--noise): their chains never meet")
    if not 1 <= at <= shared:
        raise ValueError(f"--at {at}: the two forward processes are one (the size of x_t, its operator and noise "
                         f"level) only below step {shared}: pass --at from 1 to {shared}")


class Swapped:
    """A method for sample.generate_batches: the chain of `above` (its process, steps and noise), whose network is
    replaced by below's from step `at` down."""

    num_classes = 0

    def __init__(self, above, below, below_net, at):
        check_swappable(above, below, at)
        self.above, self.below, self.below_net, self.at = above, below, below_net, at

    def sample(self, net, n, steps=None, sampler="ancestral", noise=None, y=None, cfg_scale=1.0, record=(),
               x0_error=None):
        high = ssd.network_denoiser(net, self.above.ss, parameterisation=self.above.parameterisation)
        low = ssd.network_denoiser(self.below_net, self.below.ss, parameterisation=self.below.parameterisation)
        return ssd.sample(lambda x_t, t: high(x_t, t) if t >= self.at else low(x_t, t), self.above.ss, n,
                          self.above.channels, steps, sampler, noise, record, x0_error)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs=2, help="two checkpoints or snapshots of train.py (for example SSD and DDPM)")
    p.add_argument("--at", help="the steps below which the other network draws, one or a comma list such as "
                                "438,750,937 (default: the first resolution change; any step the processes share)")
    curves.add_scoring_arguments(p)
    p.add_argument("--out", default=os.path.join("out", "swap"), help="folder for swap.md and swap.json")
    args = p.parse_args(argv)
    curves.check_scoring_arguments(p, args)
    try:
        ats = [int(step) for step in args.at.split(",")] if args.at else None
    except ValueError:
        p.error(f"--at {args.at}: give steps such as 438 or 438,750,937")
    device = pick_device(args.device)
    batch = min(args.batch_size, args.n)
    models = [sample.load_model(path, device) for path in args.ckpts]
    ats = ats or [swap_step(models[0][0], models[1][0])]
    # Each model's own chain once, then the two swapped chains of every hand-over step.
    chains = {(i, i, None): models[i][0] for i in (0, 1)}
    for at, (i, j) in itertools.product(ats, ((0, 1), (1, 0))):
        chains[i, j, at] = Swapped(models[i][0], models[j][0], models[j][1], at)  # an impossible swap stops here
    for method, net, _ in models:
        sample.speed_up(method, net, batch, None, 1.0, *sample.accelerations(args, device))

    cfg = models[0][2]["config"]
    data = load_dataset(cfg["dataset"], cfg["res"], args.data_dir or cfg["data_dir"], cfg["cache_dir"])
    extractor = fid.load_inception(args.inception, device)
    rows = []
    for (i, j, at), chain in chains.items():
        images = [to_uint8_images(x) for _, x in sample.generate_batches(chain, models[i][1], 0, args.n,
                                                                         steps=args.steps, batch_size=batch)]
        value = fid.fid_against_dataset(images, data, extractor, args.cache_dir, max_ref=args.max_ref)[0]
        rows.append(dict(above=args.ckpts[i], below=args.ckpts[j], at=at, fid=value))
        print(f"{args.ckpts[i]} | {args.ckpts[j]}" + (f" at step {at}" if at else "") + f": FID {value:.2f}")
    floor = curves.floor(data, args, extractor)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "swap.json"), "w") as f:
        json.dump(dict(at=ats, n=args.n, steps=args.steps, max_ref=args.max_ref, floor=floor, chains=rows), f,
                  indent=1)
    text = markdown_table(["network above the hand-over", "network below", "hand-over step", "FID"],
                          [[r["above"], r["below"], r["at"] or "none", f"{r['fid']:.2f}"] for r in rows])
    text += f"\n\n{args.n:,} samples at {args.steps} steps; floor: {args.n:,} training images score {floor:.2f}."
    with open(os.path.join(args.out, "swap.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    run_script(main)
