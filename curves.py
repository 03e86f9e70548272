"""
Quality per training time: FID of every EMA snapshot of some runs, against the minutes of training and the
images seen, one line per setting, in tables and one plot.

    python train.py --dataset celeba --data_dir PATH --out_dir runs/ssd4_s0 --snapshot_minutes 1,2,4,8,16 --time_budget 16
    python train.py --dataset celeba --data_dir PATH --out_dir runs/ddpm_s0 --method ddpm_x0 --snapshot_minutes 1,2,4,8,16 ...
    python curves.py runs/ssd4_s0 runs/ddpm_s0 --n 2000 --steps 100 --data_dir PATH --max_ref 6000 --out out/curves

Seeds of one setting are run folders named NAME_s<seed> (runs/ssd4_s0, runs/ssd4_s1): the summary table and the
plot give each setting's mean FID over its seeds at each snapshot, with the range (the lowest and highest seed).
Each snapshot records the hardware that counted its minutes (train.py), and seeds trained on different hardware
are summarised apart: a minute of one GPU type is not a minute of another.

Snapshots taken at steps (train.py --snapshot_steps) measure equal compute on any device, or with runs sharing one
GPU: a variant with the cost per step of a timed run, snapshotted at the steps that run reached in its minutes,
compares with it at equal time. They appear in the tables and against images seen, not against minutes.

Every snapshot is scored the same way: images 0 .. n-1 from fixed per-image seeds, the same sampler and steps,
FID against the first max_ref training images (their statistics cached once per dataset and resolution). The
floor is scored alongside: n training images against the same statistics, what n perfect samples would score.
With --x0_uncertainty the sampler draws x_0 with the network's error (sample.py), measured for each snapshot apart
from its sampling time. Scores drawn with it or with --sampler ddim are kept apart (for example
ema_<m>min.ddim.x0_transitions.json) and make settings of their own (ssd4 ddim +x0 transitions), so one snapshot
is scored several ways by several calls.

--versus ddpm adds a table of every other setting against that one, at each snapshot point both have on the same
hardware: the difference of the mean FIDs and the ratio of training images per second (from each snapshot's images
seen and training seconds): where a faster method is also better, and by how much.

A snapshot's score, with its floor, is kept beside it (ema_<m>min.json, ema_<n>steps.json), so a second call
scores only the new snapshots (or all of them, if --n, --steps or --max_ref changed): runs can be extended, or
added, and the table redrawn. A kept score outlives the snapshot's weights: once they are deleted, the table is
redrawn from the scores alone, on any machine, with no Inception weights. Sampling time is reported apart from the
training time.
"""
import argparse
import glob
import json
import os
import re
import statistics
import time

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fid  # noqa: E402
import sample  # noqa: E402
import ssd  # noqa: E402
from common import load_checkpoint, markdown_table, parse_bool, pick_device, run_script  # noqa: E402
from data import load_dataset, spread_indices, to_uint8_images  # noqa: E402


def snapshots(run_dir):
    """The snapshots of a run folder: those taken at minutes of training (ema_<m>min), in order, then those taken at
    steps (ema_<n>steps); each its weights (.pt), its kept scores (.json, .ddim.x0_<where>.json, ...), or both. A
    score outlives its weights, so a finished point stays on the curve after the weights are deleted (they are
    large)."""
    stems = set()
    scores = [score_suffix(sampler, at) for sampler in ssd.SAMPLERS for at in ssd.X0_UNCERTAINTY]
    for kind in ("min", "steps"):
        for suffix in (".pt", *scores):
            stems |= {f[:-len(suffix)] for f in glob.glob(os.path.join(run_dir, "snapshots", f"ema_*{kind}{suffix}"))}
    if not stems:
        raise FileNotFoundError(f"{run_dir} has no snapshots/ema_<minutes>min.pt or ema_<step>steps.pt: train it with "
                                "--snapshot_minutes or --snapshot_steps")

    def order(stem):
        value = os.path.basename(stem)[len("ema_"):]
        return (0, float(value[:-len("min")])) if value.endswith("min") else (1, int(value[:-len("steps")]))
    return sorted(stems, key=order)


def point(row):
    """Where a snapshot lies on its run: "4 min" of training, or "step 4,350"."""
    return f"{row['minutes']:g} min" if row["minutes"] is not None else f"step {row['step']:,}"


def score_suffix(sampler, at):
    """The end of a kept score's file name: the sampler and the x_0 uncertainty, each where it is not the default."""
    return ("" if sampler == "ancestral" else f".{sampler}") + ("" if at == "none" else f".x0_{at}") + ".json"


def score_path(stem, args):
    """Where a snapshot's score is kept: beside it, named by the sampler and the x_0 uncertainty it was drawn with."""
    return stem + score_suffix(args.sampler, args.x0_uncertainty)


def kept_score(stem, args):
    """The score kept beside a snapshot if it was made with these settings, else None (score it again). A snapshot
    whose weights are gone can only be kept as scored."""
    row, kept = None, score_path(stem, args)
    if os.path.exists(kept):
        with open(kept) as f:
            row = json.load(f)
    if row is not None and "floor" in row and (row["n"], row["steps"], row["max_ref"]) == (
            args.n, args.steps, args.max_ref):
        return row
    if not os.path.exists(stem + ".pt"):
        if row is None:
            raise FileNotFoundError(f"the weights {stem}.pt are gone and no score was kept at {kept}: call curves.py "
                                    "with the settings it was scored with, or leave this run out")
        older = "" if "floor" in row else " by an older curves.py (no floor)"
        raise FileNotFoundError(f"{kept} was scored with --n {row['n']} --steps {row['steps']} "
                                f"--max_ref {row['max_ref']}{older} and its weights {stem}.pt are gone: call curves.py "
                                "with those settings, or leave this run out")
    return None


def with_weights(path, device, args, network=None):
    """(method, network, checkpoint) of a snapshot. The snapshots of a run share a network: the first builds it,
    compiles it and records its sampling graphs (sample.speed_up); the later ones copy their EMA weights into it,
    in place, so the compiled blocks and the recorded graphs serve them unchanged."""
    if network is None:
        method, net, ckpt = sample.load_model(path, device)
        sample.speed_up(method, net, min(args.batch_size, args.n), None, 1.0, *sample.accelerations(args, device))
        return method, net, ckpt
    (method, net), ckpt = network, load_checkpoint(path)
    net.load_state_dict(ckpt["ema"])
    return method, net, ckpt


def score(path, args, device, extractor, references, network=None):
    """FID of one snapshot (n images, seeds 0 .. n-1), with its training record, the sampling time and the floor;
    and the (method, network) it was drawn with, for the run's next snapshot."""
    method, net, ckpt = with_weights(path, device, args, network)
    cfg = ckpt["config"]
    key = (cfg["dataset"], cfg["res"], args.data_dir or cfg["data_dir"], cfg["cache_dir"])
    if key not in references:  # one reference per dataset and resolution
        data = load_dataset(*key)
        references[key] = data, floor(data, args, extractor)
    data, floor_fid = references[key]
    batch_size = min(args.batch_size, args.n)
    start = time.time()
    x0_error = None if args.x0_uncertainty == "none" else sample.measure_x0_error(
        method, net, data, args.steps, args.x0_uncertainty, batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    measuring = time.time() - start
    start = time.time()
    images = [to_uint8_images(x) for _, x in sample.generate_batches(method, net, 0, args.n, steps=args.steps,
                                                                     sampler=args.sampler, batch_size=batch_size,
                                                                     x0_error=x0_error)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sampling = time.time() - start
    value, n, n_ref = fid.fid_against_dataset(images, data, extractor, args.cache_dir, max_ref=args.max_ref)
    return dict(snapshot=path, method=ckpt["spec"]["method"], minutes=ckpt["minutes"],
                train_seconds=ckpt["train_seconds"], step=ckpt["step"], images_seen=ckpt["images_seen"], fid=value,
                n=n, n_ref=n_ref, max_ref=args.max_ref, steps=args.steps, sampling_seconds=sampling, data=list(key),
                sampler=args.sampler, x0_uncertainty=args.x0_uncertainty, x0_error_seconds=measuring,
                floor=floor_fid, device=ckpt.get("device")), (method, net)


def floor(data, args, extractor):
    """FID of n training images, spread over the dataset, against the same reference statistics: what n perfect
    samples would score. A floor for the table: no snapshot's n samples can be expected to score below it."""
    images = data.images[spread_indices(len(data), args.n)]
    return fid.fid_against_dataset(images, data, extractor, args.cache_dir, max_ref=args.max_ref)[0]


def floors(rows):
    """The floor of each dataset and sample count among the rows, as kept with their scores."""
    out = {}
    for r in rows:
        out.setdefault((*r["data"][:2], r["n"], r["n_ref"]), r["floor"])
    return [dict(dataset=dataset, res=res, n=n, n_ref=n_ref, fid=value)
            for (dataset, res, n, n_ref), value in out.items()]


def run_name(run_dir):
    """A run's name: its folder's (runs/ssd4_s1/ -> ssd4_s1)."""
    return os.path.basename(os.path.normpath(run_dir))


def setting_of(row):
    """A row's setting: its run folder's name without the seed suffix (ssd4_s1 -> ssd4), and the sampler and the
    x_0 uncertainty it was sampled with, where they are not the defaults."""
    sampler = row.get("sampler", "ancestral")  # scores kept before the options existed used the defaults
    at = row.get("x0_uncertainty", "none")
    return (re.sub(r"_s\d+$", "", row["run"]) + ("" if sampler == "ancestral" else f" {sampler}")
            + ("" if at == "none" else f" +x0 {at}"))


def trained_on(row):
    """The hardware a snapshot was trained on, as train.py recorded it (older snapshots did not)."""
    return row.get("device") or "not recorded"


def summary(rows):
    """Per setting, hardware and snapshot point: the number of seeds, the mean FID and its range, the mean images
    seen, and the mean training images per second (None where a snapshot did not record its training time)."""
    groups = {}
    for r in rows:
        groups.setdefault((setting_of(r), trained_on(r), point(r)), []).append(r)
    out = []
    for (setting, device, where), group in groups.items():
        fids = [r["fid"] for r in group]
        timed = all(r.get("train_seconds") for r in group)
        out.append(dict(setting=setting, method=group[0]["method"], device=device, point=where,
                        minutes=group[0]["minutes"], seeds=len(group),
                        fid=statistics.mean(fids), fid_min=min(fids), fid_max=max(fids),
                        images_seen=statistics.mean(r["images_seen"] for r in group),
                        images_per_s=statistics.mean(r["images_seen"] / r["train_seconds"] for r in group)
                        if timed else None))
    return out


def versus(settings, reference):
    """Each setting against the reference setting where both have a point on the same hardware: the difference of
    their mean FIDs (negative: the setting is better) and the ratio of their training images per second."""
    ours = {(r["device"], r["point"]): r for r in settings if r["setting"] == reference}
    out = []
    for r in settings:
        ref = ours.get((r["device"], r["point"]))
        if r["setting"] == reference or ref is None:
            continue
        speed = r["images_per_s"] / ref["images_per_s"] if r["images_per_s"] and ref["images_per_s"] else None
        out.append(dict(setting=r["setting"], device=r["device"], point=r["point"], seeds=r["seeds"], fid=r["fid"],
                        reference=reference, reference_seeds=ref["seeds"], reference_fid=ref["fid"],
                        difference=r["fid"] - ref["fid"], speed=speed))
    return out


def versus_table(rows):
    return markdown_table(
        ["setting", "trained on", "snapshot", "seeds", "FID, mean", rows[0]["reference"] + ": seeds",
         "FID, mean", "difference", "training img/s, ratio"],
        [[r["setting"], r["device"], r["point"], r["seeds"], f"{r['fid']:.2f}", r["reference_seeds"],
          f"{r['reference_fid']:.2f}", f"{r['difference']:+.2f}", "-" if r["speed"] is None else f"{r['speed']:.2f}x"]
         for r in rows])


def summary_table(settings):
    return markdown_table(
        ["setting", "method", "trained on", "snapshot", "seeds", "images seen", "FID, mean", "lowest - highest"],
        [[r["setting"], r["method"], r["device"], r["point"], r["seeds"], f"{r['images_seen']:,.0f}",
          f"{r['fid']:.2f}", f"{r['fid_min']:.2f} - {r['fid_max']:.2f}"] for r in settings])


def table(rows):
    return markdown_table(
        ["run", "method", "trained on", "snapshot", "step", "images seen", "FID", "sampling s"],
        [[r["run"], r["method"], trained_on(r), point(r), f"{r['step']:,}", f"{r['images_seen']:,}",
          f"{r['fid']:.2f}", f"{r['sampling_seconds']:.1f}"] for r in rows])


def plot(settings, rows, path):
    """FID against training minutes (the snapshots taken at minutes) and against images seen (all of them): a
    setting's mean over its seeds, its range shaded; the hardware named when the runs span more than one."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    several = len({r["device"] for r in settings}) > 1
    for i, (setting, device) in enumerate(dict.fromkeys((r["setting"], r["device"]) for r in settings)):
        mine = [r for r in settings if (r["setting"], r["device"]) == (setting, device)]
        seeds = max(r["seeds"] for r in mine)
        label = f"{setting} ({mine[0]['method']}, {seeds} seed{'s' if seeds > 1 else ''}" + (
            f", {device.replace('NVIDIA ', '')})" if several else ")")
        timed = [r for r in mine if r["minutes"] is not None]
        for ax, points, x in ((axes[0], timed, [r["minutes"] for r in timed]),
                              (axes[1], mine, [r["images_seen"] for r in mine])):
            if points:  # one colour per setting on both panels
                ax.plot(x, [r["fid"] for r in points], "o-", color=f"C{i % 10}", label=label)
                ax.fill_between(x, [r["fid_min"] for r in points], [r["fid_max"] for r in points],
                                color=f"C{i % 10}", alpha=0.2)
    for ax, xlabel in zip(axes, ("minutes of training", "images seen")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"FID ({rows[0]['n']} samples, {rows[0]['steps']} steps)")
    minutes = sorted({r["minutes"] for r in settings if r["minutes"] is not None})
    if minutes:
        axes[0].set_xticks(minutes, [f"{m:g}" for m in minutes])
        axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_scoring_arguments(p):
    """The settings of an FID score, shared with swap.py: what is drawn, against what, and on which device."""
    p.add_argument("--n", type=int, default=2000, help="samples per score")
    p.add_argument("--steps", type=int, default=100, help="respaced sampling steps")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--data_dir", help="the training data (default: the checkpoint's own)")
    p.add_argument("--max_ref", type=int, help="use the first N training images as the reference")
    p.add_argument("--inception", help="Inception weights (see fid.py)")
    p.add_argument("--cache_dir", default="cache", help="where the reference statistics are cached")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", type=parse_bool, help="torch.compile the network (default: on CUDA)")
    p.add_argument("--cuda_graphs", type=parse_bool, help="replay the sampling forwards as CUDA graphs (default: on "
                                                         "CUDA)")


def check_scoring_arguments(p, args):
    if args.n < 2 or args.steps < 1:
        p.error("--n must be at least 2 and --steps at least 1")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders of train.py --snapshot_minutes or --snapshot_steps")
    add_scoring_arguments(p)
    p.add_argument("--sampler", choices=ssd.SAMPLERS, default="ancestral", help="as sample.py's")
    p.add_argument("--x0_uncertainty", choices=ssd.X0_UNCERTAINTY, default="none",
                   help="draw x_0 with the network's error at the resolution changes or at every step (sample.py)")
    p.add_argument("--versus", help="a setting (a run name without its _s<seed>, e.g. ddpm) to compare every other "
                                    "with, point by point on the same hardware: FID difference and speed ratio")
    p.add_argument("--out", default=os.path.join("out", "curves"), help="folder for curves.md, .json and .png")
    args = p.parse_args(argv)
    check_scoring_arguments(p, args)
    names = list(dict.fromkeys(setting_of(dict(run=run_name(run), sampler=args.sampler,
                                               x0_uncertainty=args.x0_uncertainty))
                               for run in args.runs))
    if args.versus is not None and args.versus not in names:
        p.error(f"--versus {args.versus}: no such setting among these runs ({', '.join(names)})")
    device = pick_device(args.device)
    files = {run: snapshots(run) for run in args.runs}
    kept = {stem: kept_score(stem, args) for stems in files.values() for stem in stems}  # all checked before any work
    os.makedirs(args.out, exist_ok=True)
    rows, references, extractor = [], {}, None
    for run, stems in files.items():
        network = None  # the run's, once its first snapshot to score has built it
        for stem in stems:
            row = kept[stem]
            if row is None:
                extractor = extractor or fid.load_inception(args.inception, device)  # only when there is work
                row, network = score(stem + ".pt", args, device, extractor, references, network)
                with open(score_path(stem, args), "w") as f:
                    json.dump(row, f, indent=1)
            rows.append(dict(row, run=run_name(run)))
            print(f"{rows[-1]['run']} {point(row)} (step {row['step']:,}): FID {row['fid']:.2f}")
    settings, bottoms = summary(rows), floors(rows)
    against = versus(settings, args.versus) if args.versus else []
    with open(os.path.join(args.out, "curves.json"), "w") as f:
        json.dump(dict(runs=rows, settings=settings, floors=bottoms, versus=against), f, indent=1)
    text = "\n".join([summary_table(settings), ""] + [
        f"Floor: {f['n']:,} training images of {f['dataset']} at {f['res']} px score {f['fid']:.2f} against the same "
        f"{f['n_ref']:,}-image statistics." for f in bottoms] + (
        ["", f"Against {args.versus}, at the same point on the same hardware (a negative difference: lower FID; the "
             "ratio of training images per second, from the snapshots' images seen and training seconds):", "",
         versus_table(against)] if against else []) + ["", "Every snapshot:", "", table(rows)])
    with open(os.path.join(args.out, "curves.md"), "w") as f:
        f.write(text + "\n")
    plot(settings, rows, os.path.join(args.out, "curves.png"))
    print(text)


if __name__ == "__main__":
    run_script(main)
