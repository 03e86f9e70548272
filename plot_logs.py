"""
Plot training logs (the log.jsonl that train.py writes): the loss of every resolution path against the step.

    python plot_logs.py out/log.jsonl                                # one run
    python plot_logs.py runA/log.jsonl runB/log.jsonl --out curves.png
    python plot_logs.py out/log.jsonl --grad_norm                    # the largest gradient norm per log window

Each path (input resolution -> output resolution) gets its own panel, so the levels of different runs can be
compared; a run is one colour. Points are the mean loss over the steps between two log lines.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def path_order(name):
    """Largest input resolution first, and resolution-preserving before resolution-increasing paths; paths that
    are not resolution pairs (an MSF run's "msf") after them."""
    if "->" not in name:
        return (1, 0, name)
    src, dst = map(int, name.split("->"))
    return (-src, dst != src, "")


def plot(logs, out, key="loss_per_path"):
    paths = sorted({p for records in logs.values() for r in records for p in r.get(key, {})}, key=path_order)
    cols = min(4, len(paths))
    rows = -(-len(paths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, path in zip(axes.flat, paths):
        for name, records in logs.items():
            points = [(r["step"], r[key][path]) for r in records if path in r.get(key, {})]
            if points:
                ax.plot(*zip(*points), label=name, lw=1)
        ax.set_title(f"path {path}")
        ax.set_xlabel("step")
        ax.set_ylabel("weighted loss" if key == "loss_per_path" else "gradient norm (max)")
        ax.set_yscale("log")
    for ax in axes.flat[len(paths):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"saved {out}: {len(paths)} paths, runs {', '.join(logs)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files written by train.py")
    parser.add_argument("--out", default="loss_curves.png")
    parser.add_argument("--grad_norm", action="store_true", help="plot the gradient norms instead of the losses")
    args = parser.parse_args()
    # A run is named by its folder: out_dir/log.jsonl -> out_dir.
    logs = {os.path.basename(os.path.dirname(os.path.abspath(p))): read_log(p) for p in args.logs}
    plot(logs, args.out, "grad_norm_per_path" if args.grad_norm else "loss_per_path")
