"""
Training health, block by block: where a loss spike starts.

A spike shows first in one block of the network, then spreads. To see which, train.py logs per block (the stem,
each encoder / middle / decoder block, the head, the embeddings, the adapters):

- the gradient norm of the block's parameters, the largest over the log window (every step, on the device);
- the size of the optimiser's update relative to the weights, ||w_new - w_old|| / ||w_old|| (at log steps);
- the largest activation at the block's output, and the largest attention logit |q.k| / sqrt(d) of the block's
  attention layer, from an eager forward pass of a few of the step's images (at log steps, no gradients).

    python plot_logs.py out/log.jsonl --metric block_grad_norm     # one line per block
"""
import math

import torch

from flexi_unet import Attention

# Parameter names of the UNet start with one of these: a list of blocks (the block is the name and its index) or a
# single block. Names of MSF's two UNets carry a prefix ("base.", "residual.").
BLOCK_LISTS = ("encoder", "middle", "decoder", "in_adapters", "out_adapters")
SINGLE_BLOCKS = ("stem", "head", "time_embed", "label_embed")
FORWARD_IMAGES = 16  # images of the step's batch that the activation pass sees: maxima need no large batch


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
    """The logits q.k / sqrt(d) of an Attention layer on its input x, in float32."""
    q, k, _ = module.project(x)
    return (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
