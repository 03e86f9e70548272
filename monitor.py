"""
What a training run measures and writes to its log (out_dir/log.jsonl, one JSON record per line).

Per resolution path, over the steps since the last line: the mean loss and the largest gradient norm; and the
speed, MFU and memory. A loss far above the recent ones, or a non-finite weight, stops the run before a checkpoint
could keep it.

Per block, because a loss spike shows first in one block of the network and then spreads (the stem, each
encoder / middle / decoder block, the head, the embeddings, the adapters):

- the gradient norm of the block's parameters, the largest over the log window (every step, on the device);
- the size of the optimiser's update relative to the weights, ||w_new - w_old|| / ||w_old|| (at log steps);
- the largest activation at the block's output, and the largest attention logit |q.k| / sqrt(d) of the block's
  attention layer, from an eager forward pass of a few of the step's images (at log steps, no gradients).

    python plot_logs.py out/log.jsonl --metric block_grad_norm     # one line per block
"""
import json
import math
import os
import statistics
import time

import torch

from flexi_unet import Attention

# Parameter names of the UNet start with one of these: a list of blocks (the block is the name and its index) or a
# single block. Names of MSF's two UNets carry a prefix ("base.", "residual.").
BLOCK_LISTS = ("encoder", "middle", "decoder", "in_adapters", "out_adapters")
SINGLE_BLOCKS = ("stem", "head", "time_embed", "label_embed")
FORWARD_IMAGES = 16  # images of the step's batch that the activation pass sees: maxima need no large batch
DIVERGENCE_FACTOR = 100  # a path's loss this many times the median of its recent ones: the run diverged


def block_of(name):
    """The block a parameter (or module) name belongs to: "encoder.3.res.conv1.weight" -> "encoder.3"."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in BLOCK_LISTS:
            return ".".join(parts[:i + 2])
        if part in SINGLE_BLOCKS:
            return ".".join(parts[:i + 1])
    return name


class Monitor:
    def __init__(self, model):
        self.model = model
        named = list(model.named_parameters())
        self.blocks = list(dict.fromkeys(block_of(name) for name, _ in named))  # in the model's own order
        self.block_id = {id(p): self.blocks.index(block_of(name)) for name, p in named}
        self.index = {}  # path name -> block index of each parameter on the path (a device tensor)
        self.window = None

    def gradient_norm(self, path, trained):
        """Total gradient norm of the trained parameters (for clipping and the log), and the largest norm of each
        block over the window updated, all on the device: no host sync."""
        if path not in self.index:
            self.index[path] = torch.tensor([self.block_id[id(p)] for p in trained], device=trained[0].device)
        norms = torch.stack(torch._foreach_norm([p.grad for p in trained]))
        per_block = norms.new_zeros(len(self.blocks)).index_add_(0, self.index[path], norms.square()).sqrt()
        self.window = per_block if self.window is None else torch.maximum(self.window, per_block)
        return torch.linalg.vector_norm(norms)  # as torch.nn.utils.get_total_norm computes it

    def before_update(self, trained):
        """Keep a copy of the weights the optimiser is about to change (at log steps)."""
        self.before = (trained, [p.detach().clone() for p in trained])

    def update_ratios(self):
        """||w_new - w_old|| / ||w_old|| per block, for the copy taken by before_update."""
        trained, old = self.before
        index = torch.tensor([self.block_id[id(p)] for p in trained], device=old[0].device)
        delta = torch.stack(torch._foreach_norm(torch._foreach_sub([p.detach() for p in trained], old))).float()
        weight = torch.stack(torch._foreach_norm(old)).float()
        sums = torch.zeros(2, len(self.blocks), device=old[0].device)
        sums[0].index_add_(0, index, delta.square())
        sums[1].index_add_(0, index, weight.square())
        self.before = None
        return (sums[0] / sums[1]).sqrt()  # NaN for blocks off the path: dropped from the log

    @torch.no_grad()
    def forward_maxima(self, run):
        """(largest |activation| per block, largest attention logit per block) of an eager forward pass:
        run() calls the network; hooks read every block's output and recompute the attention logits."""
        found = {"act": {}, "logit": {}}  # kind -> block index -> device scalars

        def hook(i, kind):
            def read(module, args, output):
                value = output if kind == "act" else attention_logits(module, args[0])
                found[kind].setdefault(i, []).append(value.detach().abs().amax().float())
            return read

        handles = []
        for name, module in self.model.named_modules():
            if name in self.blocks:
                handles.append(module.register_forward_hook(hook(self.blocks.index(name), "act")))
            if isinstance(module, Attention):
                handles.append(module.register_forward_hook(hook(self.blocks.index(block_of(name)), "logit")))
        was_training = self.model.training
        self.model.eval()  # no dropout: the pass draws no random numbers, so resumed runs stay exact
        try:
            with torch.compiler.set_stance("force_eager"):  # compiled blocks run their Python code: hooks fire
                run()
        finally:
            self.model.train(was_training)
            for handle in handles:
                handle.remove()
        return tuple(self.per_block({i: torch.stack(v).max() for i, v in found[kind].items()})
                     for kind in ("act", "logit"))

    def per_block(self, values):
        """A block-indexed device tensor from {block index: scalar}, NaN where a block has no value."""
        out = torch.full((len(self.blocks),), float("nan"))
        if values:
            out[list(values)] = torch.stack(list(values.values())).cpu()
        return out

    def record(self, updates=None, maxima=None):
        """The block fields of a log record (the window's gradient norms, and the log step's measurements),
        as {block: float} with 4 significant digits; resets the window."""
        fields = {"grad_norm_per_block": self.window, "update_ratio_per_block": updates}
        if maxima is not None:
            fields["act_max_per_block"], fields["attn_logit_max_per_block"] = maxima
        self.window = None
        return {key: {b: significant(v) for b, v in zip(self.blocks, values.tolist()) if math.isfinite(v)}
                for key, values in fields.items() if values is not None}


def significant(value, digits=4):
    return float(f"{value:.{digits}g}")


def attention_logits(module, x):
    """The logits q.k / sqrt(d) of an Attention layer on its input x, in float32 (autocast off: it would multiply
    in bf16)."""
    q, k, _ = module.project(x)
    with torch.autocast(x.device.type, enabled=False):
        return (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])


# -----------------------------------------------------------------------------
# the log line


class Window:
    """What a log line sums up: per path the loss sum, step count and largest gradient norm (device tensors: no
    sync per step), the model FLOPs, the steps and the time since the last line."""

    def __init__(self):
        self.loss, self.count, self.grad_norm = {}, {}, {}
        self.flops, self.steps, self.start = 0.0, 0, time.time()

    def add(self, path, loss, grad_norm, flops=0.0):
        self.loss[path] = self.loss.get(path, 0) + loss
        self.count[path] = self.count.get(path, 0) + 1
        self.grad_norm[path] = torch.maximum(self.grad_norm.get(path, grad_norm), grad_norm)
        self.flops += flops
        self.steps += 1

    def record(self, step, images_seen, batch_size, device, world=1, peak_flops=None):
        """The log record: loss overall and per path, gradient norms, throughput, MFU and memory. Under DDP the
        losses are the global batch's, so every rank logs, and stops on, the same numbers."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.time() - self.start
        paths = sorted(self.loss)
        sums = torch.stack([self.loss[p] for p in paths] + [self.grad_norm[p] for p in paths])
        if world > 1:
            torch.distributed.all_reduce(sums)
            sums /= world
        values = sums.tolist()  # the one sync per log line
        per_path = {p: v / self.count[p] for p, v in zip(paths, values)}
        record = dict(step=step, images_seen=images_seen,
                      loss=sum(per_path[p] * self.count[p] for p in paths) / self.steps, loss_per_path=per_path,
                      grad_norm_per_path=dict(zip(paths, values[len(paths):])),  # the largest since the last line
                      images_per_s=self.steps * batch_size / seconds, ms_per_step=1000 * seconds / self.steps,
                      time=time.time())
        if peak_flops:
            record["mfu"] = self.flops / seconds / peak_flops
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        return record


class RunLog:
    """The JSON-lines log of a run, written by rank 0 (and sent to Weights & Biases if asked). A resumed run first
    drops the lines after its checkpoint (steps that run again), so the log reads as one run."""

    def __init__(self, path, resumed_step=None, wandb_project=None, config=None):
        kept = []
        if resumed_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_step]
        self.file = open(path, "w")
        self.file.writelines(kept)
        self.file.flush()
        self.wandb = start_wandb(wandb_project, config, resumed_step is not None) if wandb_project else None

    def write(self, record):
        self.file.write(json.dumps(json_safe(record)) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log(record, step=record["step"])

    def close(self):
        self.file.close()


def json_safe(value):
    """A record as standard JSON: a non-finite loss (the step a run diverged) becomes null, not NaN."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def start_wandb(project, config, resume):
    """Weights & Biases logging, an optional extra: the JSON-lines log is the record of a run."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb_project needs the wandb package: pip install wandb (or leave the flag out)") from None
    wandb.init(project=project, config=config, resume="allow" if resume else None)
    return wandb


def check_divergence(record, params, history, kept, ckpt_path):
    """Stop before a checkpoint could keep a diverged model: non-finite weights or loss, or a path's loss far above
    its recent values (a finite loss of 1e8 is no good checkpoint either). Each path is judged against itself, since
    the paths' losses differ by orders of magnitude. history: {path: the losses of the earlier lines}; kept: the
    step of the checkpoint on disk, or None."""
    loss = record["loss"]
    weights_finite = bool(torch.stack([p.isfinite().all() for p in params]).all())
    ratios = {path: value / statistics.median(history[path][-20:]) for path, value in record["loss_per_path"].items()
              if len(history.get(path, ())) >= 3 and math.isfinite(value)}
    path, ratio = max(ratios.items(), key=lambda item: item[1], default=(None, 0.0))
    if weights_finite and math.isfinite(loss) and ratio <= DIVERGENCE_FACTOR:
        for name, value in record["loss_per_path"].items():
            history.setdefault(name, []).append(value)
        return
    why = ("weights not finite" if not weights_finite else "loss not finite" if not math.isfinite(loss) else
           f"{ratio:.0f}x the median of the recent losses of path {path}")
    kept = (f"the last good checkpoint (step {kept}) is kept in {ckpt_path}" if kept is not None else
            "this run wrote no checkpoint yet")
    raise FloatingPointError(f"training diverged at step {record['step']} (loss {loss:.4g}, {why}); {kept}. Lower "
                             f"--lr, set --grad_clip 1, or --warmup 1000")
