"""
Plot training logs (the log.jsonl that train.py writes) against the step: per resolution path, or per block.

    python plot_logs.py out/log.jsonl                                # loss per path -> out/loss_curves.png
    python plot_logs.py runA/log.jsonl runB/log.jsonl --out curves.png
    python plot_logs.py out/log.jsonl --metric grad_norm             # the largest gradient norm per log window
    python plot_logs.py out/log.jsonl --metric block_grad_norm       # one line per block: where a spike starts

Metrics (--metric; --grad_norm is an alias of --metric grad_norm), each a field of the log lines:
  per path, one panel per path (input resolution -> output resolution), a run one colour, so the levels of
  different runs can be compared:
    loss            loss_per_path: the mean weighted loss over the steps between two log lines
    grad_norm       grad_norm_per_path: the largest gradient norm over those steps
  per block, one panel per run, a block one line (stem, encoder.0, ..., middle, decoder, head, then the others),
  so a reader sees which block departs first in a spike:
    block_grad_norm grad_norm_per_block: the largest gradient norm of the block's parameters over the window
    update_ratio    update_ratio_per_block: ||delta w|| / ||w|| of the optimiser step at the log step
    act_max         act_max_per_block: the largest |activation| at the block's output
    attn_logit_max  attn_logit_max_per_block: the largest |q.k| / sqrt(d) of the block's attention
Lines without the field, or with a null (a diverged step), are skipped. The figure goes to out/ unless --out
names another file.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# --metric -> (log field, "path" or "block" panels, y-axis label)
METRICS = {
    "loss": ("loss_per_path", "path", "weighted loss"),
    "grad_norm": ("grad_norm_per_path", "path", "gradient norm (max)"),
    "block_grad_norm": ("grad_norm_per_block", "block", "block gradient norm (max)"),
    "update_ratio": ("update_ratio_per_block", "block", "update ||delta w|| / ||w||"),
    "act_max": ("act_max_per_block", "block", "max |activation| at the block's output"),
    "attn_logit_max": ("attn_logit_max_per_block", "block", "max attention logit |q.k| / sqrt(d)"),
}
BLOCK_KINDS = ("stem", "encoder", "middle", "decoder", "head")  # the network's order; other blocks follow them
DEPARTURE = 5.0  # a block departs at the first value above this many times the median of its earlier values


def read_log(path):
    """The records of a log.jsonl; a last line still being written (no newline yet) is left out."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # what follows the last newline is unfinished
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not JSON ({e.msg}): is it a log.jsonl written by "
                                 f"train.py?") from None
    return records


def path_order(name):
    """Largest input resolution first, and resolution-preserving before resolution-increasing paths; paths that
    are not resolution pairs (an MSF run's "msf") after them."""
    if "->" not in name:
        return (1, 0, name)
    src, dst = map(int, name.split("->"))
    return (-src, dst != src, "")


def block_order(name):
    """Blocks in the order data flows: stem, encoder.0, encoder.1, ..., middle, decoder, head, then the others
    (embeddings, adapters) by name. A prefix ("base.", "residual." in MSF runs) groups a network's blocks."""
    parts = name.split(".")
    index = int(parts[-1]) if parts[-1].isdigit() else -1
    named = parts[:-1] if index >= 0 else parts
    prefix, kind = ".".join(named[:-1]), named[-1] if named else ""
    rank = BLOCK_KINDS.index(kind) if kind in BLOCK_KINDS else len(BLOCK_KINDS)
    return (prefix, rank, kind if rank == len(BLOCK_KINDS) else "", index, name)


def series(records, key, name):
    """(steps, values) of field key's entry name over the lines that have it, skipping absent and null ones."""
    points = [(r["step"], r[key][name]) for r in records
              if isinstance(r.get(key), dict) and r[key].get(name) is not None]
    return tuple(zip(*points)) if points else ((), ())


def names_in(records, key):
    return {name for r in records if isinstance(r.get(key), dict) for name in r[key]}


def plot(logs, out, key="loss_per_path", ylabel=None):
    """One panel per path, one line per run; returns {path: {run: (steps, values)}} as drawn."""
    paths = sorted(set().union(*(names_in(records, key) for records in logs.values())), key=path_order)
    if not paths:
        raise ValueError(f"no {key} in {', '.join(logs)}: is it a log.jsonl written by train.py?")
    ylabel = ylabel or ("weighted loss" if key == "loss_per_path" else "gradient norm (max)")
    cols = min(4, len(paths))
    rows = -(-len(paths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    drawn = {}
    for ax, path in zip(axes.flat, paths):
        drawn[path] = {}
        for name, records in logs.items():
            steps, values = series(records, key, path)
            if steps:
                ax.plot(steps, values, label=name, lw=1)
                drawn[path][name] = (steps, values)
        ax.set_title(f"path {path}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
    for ax in axes.flat[len(paths):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"saved {out}: {len(paths)} paths, runs {', '.join(logs)}")
    return drawn


def first_departure(lines, factor=DEPARTURE, history=3):
    """(step, [(block, ratio), ...] largest ratio first) of the earliest step at which some block's value exceeds
    factor times the median of its own earlier values (at least `history` of them); None if none does."""
    found = {}
    for block, (steps, values) in lines.items():
        for i in range(history, len(values)):
            earlier = sorted(values[:i])
            median = earlier[len(earlier) // 2]
            if median > 0 and values[i] > factor * median:
                found[block] = (steps[i], values[i] / median)
                break
    if not found:
        return None
    step = min(s for s, _ in found.values())
    return step, sorted(((b, r) for b, (s, r) in found.items() if s == step), key=lambda item: -item[1])


def plot_blocks(logs, out, key, ylabel):
    """One panel per run, one line per block in block_order: the network's blocks coloured from the input end
    (dark) to the output end (red), the others (embeddings, adapters) grey and dotted. Marks and prints, per run,
    the block that departs first (first_departure). Returns {run: {block: (steps, values)}} as drawn."""
    runs = {name: records for name, records in logs.items() if names_in(records, key)}
    if not runs:
        raise ValueError(f"no {key} in {', '.join(logs)}: it is on the log lines of train.py runs that monitor "
                         f"their blocks")
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.6 * len(runs)), squeeze=False)
    drawn = {}
    for ax, (run, records) in zip(axes.flat, runs.items()):
        blocks = sorted(names_in(records, key), key=block_order)
        main = [b for b in blocks if block_order(b)[1] < len(BLOCK_KINDS)]
        others = [b for b in blocks if b not in main]
        colours = dict(zip(main, plt.cm.turbo([0.05 + 0.9 * i / max(1, len(main) - 1) for i in range(len(main))])))
        colours.update(zip(others, plt.cm.Greys([0.4 + 0.5 * i / max(1, len(others) - 1)
                                                 for i in range(len(others))])))
        drawn[run] = {}
        for block in blocks:
            steps, values = series(records, key, block)
            if steps:
                ax.plot(steps, values, color=colours[block], lw=0.9, ls=":" if block in others else "-", label=block)
                drawn[run][block] = (steps, values)
        departure = first_departure(drawn[run])
        if departure:  # mark where the first block leaves its own history
            ax.axvline(departure[0], color="k", lw=0.6, ls="--")
            ax.annotate(f" {departure[1][0][0]} first", (departure[0], 1), xycoords=("data", "axes fraction"),
                        va="top", fontsize=7)
        ax.set_title(f"{run}: {key}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=-(-len(blocks) // 24),
                  frameon=False, handlelength=1.5)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"saved {out}: {key} of {', '.join(runs)}")
    for run, lines in drawn.items():
        departure = first_departure(lines)
        if departure:
            step, blocks = departure
            print(f"  {run}: first above {DEPARTURE:g}x its earlier median at step {step}: "
                  + ", ".join(f"{block} ({ratio:.3g}x)" for block, ratio in blocks))
    return drawn


def run_names(paths):
    """A run is named by its folder (out_dir/log.jsonl -> out_dir); by its whole path where two folders share a
    name."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    short = [os.path.basename(f) for f in folders]
    return [s if short.count(s) == 1 else os.path.relpath(f) for s, f in zip(short, folders)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files written by train.py")
    parser.add_argument("--metric", default="loss", choices=list(METRICS), help="what to plot (default: loss)")
    parser.add_argument("--grad_norm", dest="metric", action="store_const", const="grad_norm",
                        help="the same as --metric grad_norm")
    parser.add_argument("--out", help="the figure (default: out/loss_curves.png, out/<metric>_curves.png)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join("out", f"{args.metric}_curves.png")
    key, kind, ylabel = METRICS[args.metric]
    try:
        logs = {name: read_log(p) for name, p in zip(run_names(args.logs), args.logs)}
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        (plot if kind == "path" else plot_blocks)(logs, out, key, ylabel)
    except (OSError, ValueError) as e:  # a missing or foreign log: the message says which, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
