"""
Flexi-UNet (paper Sec. 4.3, METHOD.md §5): the ADM UNet of guided-diffusion, rebuilt from scratch, with routing that lets one
network denoise every level of the resolution ladder (METHOD.md §1).

An input at resolution r enters the encoder at the level whose native resolution is r, goes down through the
middle block and back up, and leaves either at r (resolution-preserving step) or at 2r (resolution-increasing
step, METHOD.md §3: the network predicts the clean image at the next, larger resolution).

    python flexi_unet.py --res 64 --levels 4     # parameters and GFLOPs of every path
    python flexi_unet.py --all                   # against the authors' models, at 64, 128 and 256 px

Layout. The encoder is one flat list in ADM order (level 0 blocks, downsample, level 1 blocks, ...); every
entry's output is a skip. The decoder is one flat list too, and each of its blocks consumes exactly one skip,
so a path runs as many decoder blocks as there are skips on its stack. That single rule gives every route:
- full UNet: the stem output is a skip as well, so all decoder blocks run;
- Flexi, resolution-preserving: the entry feature is not a skip, so the decoder stops after the entry level's
  first num_res_blocks blocks (the block that would consume the stem's / previous downsample's skip never runs);
- Flexi, resolution-increasing: zero tensors stand in for the skips of the level above the entry (paper Sec. 4.3), so
  the decoder carries on through the upsampling block and the first num_res_blocks blocks of that level.

Choices the paper leaves open (project choices); the first two are what its parameter and GFLOPs figures require:
- A 1x1 adapter exists only where the widths differ; an equal-width adapter is the identity (so at 64 px only
  the levels 2 and 3 inputs and the levels 1-3 outputs have one). With adapters everywhere the counts overshoot.
- The decoder block that consumes the stem's skip is built in both variants, so a Flexi and a full UNet of the
  same config have identical ADM blocks; in the Flexi model it never runs (gets no gradient), as in the paper's
  parameter count.
- Every resolution-increasing step takes the zero-skip route, the last one into full resolution included (the
  authors instead run the full-resolution path on the upsampled x_t there, which costs 0.02-0.04% more GFLOPs on
  average: the whole difference to the authors' figures).
- GFLOPs include the two attention matrix products (q k^T and attention x v) everywhere. The authors' figures for the
  full ADM UNet leave them out (its Flexi figures do not): 0.55 / 0.55 / 0.72 GFLOPs at 64 / 128 / 256 px, which
  is exactly the gap of our full-UNet numbers to them.
- The full-UNet variant upsamples a low-resolution input with nearest neighbours (each pixel of x_t, and its
  noise variance, kept as is) and resizes the output down with bilinear antialias, the degradation of METHOD.md §1.
"""
import argparse
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from cuda_graphs import ForwardGraphs
from degrade import ScaleSpace
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class UNetConfig:
    res: int                              # full resolution
    levels: int                           # input resolutions served: res, res/2, ..., res/2^(levels-1)
    in_channels: int = 3                  # 1 for grayscale data; also the output channels
    cond_channels: int = 0                # extra input channels concatenated to x (msf.py: the upsampled base)
    base_channels: int = 128
    channel_mult: tuple = (1, 2, 3, 4)    # one entry per encoder level; level k runs at res / 2^k
    num_res_blocks: int = 2
    attn_res: tuple = (16, 8)             # feature sizes with self-attention (the middle block always has it)
    num_heads: int = 4
    norm_groups: int = 32                 # GroupNorm groups; must divide every width
    dropout: float = 0.0
    num_classes: int = 0                  # 0 = unconditional
    flexi: bool = True                    # False = the "full UNet" ablation (and the DDPM baseline at levels=1)
    qk_norm: bool = False                 # RMS-normalise queries and keys per head (see Attention)
    attention_fp32: bool = False          # attention logits and softmax in float32 under bf16 autocast
    upsample_into_full: bool = False      # the authors' route into full resolution (see UNet.network)
    upsample_transitions: bool = False    # the same route at every resolution increase (project option)

    def __post_init__(self):
        # Tuples keep the config hashable, the key of the GFLOPs cache.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_res", tuple(self.attn_res))
        depth = len(self.channel_mult)
        if self.res % 2 ** (depth - 1):
            raise ValueError(f"res={self.res} cannot be halved {depth - 1} times (channel_mult has {depth} "
                             f"levels); pick a res divisible by {2 ** (depth - 1)} or a shorter channel_mult")
        if not 1 <= self.levels <= depth:
            raise ValueError(f"levels={self.levels} must be between 1 and len(channel_mult)={depth}: every "
                             f"served resolution needs an encoder level of its own")
        widths = {self.base_channels * m for m in self.channel_mult}
        bad = sorted(w for w in widths if w % self.norm_groups or w % self.num_heads)
        if bad:
            raise ValueError(f"widths {bad} are not divisible by norm_groups={self.norm_groups} and "
                             f"num_heads={self.num_heads}; change base_channels or these two fields")


def paper_config(res, levels, in_channels=3, **overrides):
    """The paper's settings (Sec. 4.3: ADM, 128 channels, 2 blocks, attention at 16 and 8, 4 heads)."""
    mults = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}
    if res not in mults:
        raise ValueError(f"the paper has no UNet for res={res}; use one of {sorted(mults)} or build UNetConfig")
    return UNetConfig(res=res, levels=levels, in_channels=in_channels, channel_mult=mults[res], **overrides)


def tiny_config(res, levels, in_channels=3, **overrides):
    """A small UNet for CPU tests and quick runs: 32 channels, 1 block per level, attention at res/4."""
    settings = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_res=(res // 4,),
                    num_heads=2, norm_groups=8)
    settings.update(overrides)
    return UNetConfig(res=res, levels=levels, in_channels=in_channels, **settings)


def memory_format(x):
    """channels_last if x is stored channels-last, else contiguous_format (also when both fit, as for a 1x1 map)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def zero_init(module):
    # ADM zero-initialises the last layer of every residual branch and the output conv: each block starts as
    # the identity and the network as a constant, which keeps early training stable.
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def adapter(in_ch, out_ch):
    """1x1 conv between widths (paper Sec. 4.3), the identity between equal ones (see the header)."""
    return nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim), as in ADM: [cos | sin] of t * 10^(-4k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, written for torch.compile from per-channel statistics.

    In a channels-last activation a group's values are a few channels per pixel, strided across the whole tensor.
    Compiled for CUDA, torch's GroupNorm reshapes its input to (batch, groups, channels per group, pixels), so its
    output is channels-first, and the convolution after it converts between the two formats in its backward. Reducing
    over the pixels of each channel instead reads whole rows of channels at once and keeps the input's layout; the
    group's mean and variance follow exactly from its channels': the mean of their means, and the mean of their
    variances plus the variance of their means. With row_blocks > 1 each channel's statistics are taken over that
    many equal blocks of rows and combined the same way: more, shorter reductions, so more of them run side by side.
    With fused_grads the backward is written out (GroupNormGrads) rather than derived by autograd, its sums over
    the pixels taken over the same blocks of rows. Eager runs keep the native kernel, and so do compiled ones with
    per_channel False (UNet.compile_blocks). Statistics and output in fp32, as autocast runs GroupNorm.
    x: (batch, channels, height, width)."""

    per_channel = True
    row_blocks = 1
    fused_grads = False

    def forward(self, x):
        if not (self.per_channel and torch.compiler.is_compiling()):
            return super().forward(x)
        if self.fused_grads:
            return GroupNormGrads.apply(x, self.weight, self.bias, self.num_groups, self.eps, self.row_blocks)
        x = x.float()
        return normalize(x, *group_stats(x, self.num_groups, self.eps, self.row_blocks), self.weight, self.bias)


def group_stats(x, groups, eps, row_blocks=1):
    """Each image's and group's mean and 1/std, (batch, groups, 1), from per-channel statistics over row_blocks
    blocks of rows, combined exactly (GroupNorm)."""
    var_b, mean_b = torch.var_mean(row_blocks_of(x, row_blocks), dim=(3, 4), correction=0)  # (B, C, blocks)
    var_b, mean_b = (s.unflatten(1, (groups, -1)).flatten(2) for s in (var_b, mean_b))  # (B, G, n)
    mean = mean_b.mean(2, keepdim=True)
    var = var_b.mean(2, keepdim=True) + (mean_b - mean).square().mean(2, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def row_blocks_of(x, row_blocks):
    """(B, C, H, W) -> (B, C, blocks, H / blocks, W): as many equal blocks of rows as row_blocks and H allow."""
    return x.unflatten(2, (math.gcd(row_blocks, x.shape[2]), -1))


def per_channel(group_stat, channels):
    """(B, G, 1) -> (B, C, 1, 1): each group's value for each of its channels."""
    return group_stat.expand(-1, -1, channels // group_stat.shape[1]).reshape(group_stat.shape[0], -1, 1, 1)


def normalize(x, mean, rstd, weight, bias):
    """(x - mean) * rstd * weight + bias, mean and rstd per image and group (group_stats)."""
    channels = x.shape[1]
    return (x - per_channel(mean, channels)) * per_channel(rstd, channels) * weight.view(-1, 1, 1) \
        + bias.view(-1, 1, 1)


class GroupNormGrads(torch.autograd.Function):
    """The per-channel GroupNorm with its backward written out. With x_hat = (x - mean) * rstd and dy the output's
    gradient, one pass over x and dy gives each image's and channel's sums of dy and of dy * x_hat; the bias's and
    weight's gradients are their sums over the images, and the input's gradient is
    rstd * (weight * dy - a - x_hat * c), a and c the group means of weight * dy and of weight * dy * x_hat, which
    follow from the same sums. Autograd's own backward sums over the images and pixels once more for the weight and
    the bias. The per-channel sums are taken over row_blocks blocks of rows, then added, as the forward's statistics
    are: each block's sum is a shorter reduction, and Inductor runs more of them side by side."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, row_blocks):
        x32 = x.float()
        mean, rstd = group_stats(x32, groups, eps, row_blocks)
        ctx.save_for_backward(x, weight, mean, rstd)  # x in its own dtype: bf16 under autocast, half of fp32's memory
        ctx.row_blocks = row_blocks
        return normalize(x32, mean, rstd, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        _, channels, height, width = x.shape
        groups = mean.shape[1]
        x_hat = (x.float() - per_channel(mean, channels)) * per_channel(rstd, channels)
        channel_sums = lambda t: row_blocks_of(t, ctx.row_blocks).sum((3, 4)).sum(2)  # (B, C)
        sum_dy, sum_dy_x_hat = channel_sums(dy), channel_sums(dy * x_hat)
        values_per_group = channels // groups * height * width
        group_mean = lambda sums: (weight * sums).unflatten(1, (groups, -1)).sum(2, keepdim=True) / values_per_group
        a, c = group_mean(sum_dy), group_mean(sum_dy_x_hat)  # (B, G, 1)
        grad_x = per_channel(rstd, channels) * (weight.view(-1, 1, 1) * dy - per_channel(a, channels)
                                                - x_hat * per_channel(c, channels))
        return grad_x.to(x.dtype), sum_dy_x_hat.sum(0), sum_dy.sum(0), None, None, None


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then scale-shift norm (FiLM) from the embedding, SiLU, dropout, zero conv; plus skip."""

    def __init__(self, in_ch, out_ch, emb_ch, groups, dropout):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual, zero-initialised output projection.

    qk_norm (project option, off in the paper's model): queries and keys are RMS-normalised per head, with a
    learned gain, before the dot product. The logits q.k / sqrt(d) are then bounded by the gains instead of by the
    growing qkv weights, which keeps the softmax out of saturation and its bf16 rounding error small.
    """

    def __init__(self, ch, heads, groups, qk_norm=False, fp32=False):
        super().__init__()
        self.heads, self.fp32 = heads, fp32
        self.norm = GroupNorm(groups, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_init(nn.Linear(ch, ch))
        self.q_gain = nn.Parameter(torch.ones(ch // heads)) if qk_norm else None
        self.k_gain = nn.Parameter(torch.ones(ch // heads)) if qk_norm else None

    def project(self, x):
        """Queries, keys and values of a (B, C, H, W) feature map, each (B, heads, H*W, C / heads)."""
        B, C, H, W = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # a free view for channels_last input
        q, k, v = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.q_gain is not None:  # the norm in float32: its mean of squares is a reduction
            q = F.rms_norm(q.float(), q.shape[-1:], self.q_gain.float()).to(v.dtype)
            k = F.rms_norm(k.float(), k.shape[-1:], self.k_gain.float()).to(v.dtype)
        return q, k, v

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.project(x)
        if self.fp32:  # autocast would cast the inputs of the attention back to bf16: it is off around it
            with torch.autocast(x.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # fused kernel on GPU; scale 1/sqrt(head dim) as ADM
        out = self.proj(out.transpose(1, 2).reshape(B, H * W, C))
        return x + out.view(B, H, W, C).permute(0, 3, 1, 2)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        # Nearest-neighbour 2x as a broadcast: its backward is a sum over each 2x2 cell, where the backward of
        # F.interpolate(mode="nearest") scatters with atomic adds, which is slower. The broadcast follows x's memory
        # order, so a channels-last map stays channels-last (and cuDNN converts nothing).
        B, C, H, W = x.shape
        if memory_format(x) is torch.channels_last:
            h = x.permute(0, 2, 3, 1)[:, :, None, :, None].expand(B, H, 2, W, 2, C).reshape(B, 2 * H, 2 * W, C)
            return self.conv(h.permute(0, 3, 1, 2))
        return self.conv(x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb):  # takes emb only so that the encoder is one flat list of blocks
        return self.conv(x)


class Head(nn.Sequential):
    """ADM's output: GroupNorm, SiLU, then a zero-initialised 3x3 convolution to the image channels. Its forward is
    defined here, not inherited, so that torch.compile traces it (see UNet.compile_blocks)."""

    def __init__(self, groups, ch, out_ch):
        super().__init__(GroupNorm(groups, ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_ch, 3, padding=1)))

    def forward(self, x):
        return super().forward(x)


class Block(nn.Module):
    """One ADM stage: a residual block, then attention and an upsample where the level calls for them. A decoder
    block joins its skip with JoinSkip, or with torch.cat when dense_skip_grads is False (UNet.compile_blocks)."""

    dense_skip_grads = True

    def __init__(self, in_ch, out_ch, emb_ch, cfg, attention, upsample=False):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_ch, cfg.norm_groups, cfg.dropout)
        self.attn = (Attention(out_ch, cfg.num_heads, cfg.norm_groups, cfg.qk_norm, cfg.attention_fp32)
                     if attention else nn.Identity())
        self.up = Upsample(out_ch) if upsample else nn.Identity()

    def forward(self, x, emb, skip=None):
        if skip is not None:  # a decoder block joins its skip here, inside its compiled graph (UNet.compile_blocks)
            x = JoinSkip.apply(x, skip) if self.dense_skip_grads else torch.cat([x, skip], dim=1)
        return self.up(self.attn(self.res(x, emb)))


class JoinSkip(torch.autograd.Function):
    """torch.cat([x, skip], dim=1), whose backward hands each input its gradient as a dense tensor in the skip's
    layout. torch.cat's own backward hands out strided views into one gradient, and both end up in eager passes
    outside the compiled graphs: autograd adds the skip's to the gradient from the encoder's next block, and the
    previous block's graph copies x's into the layout it was compiled for. On a strided view either pass is an
    unvectorised kernel over a full-size activation. Compiled, the copies here are written straight by the kernel
    that makes the gradient."""

    @staticmethod
    def forward(ctx, x, skip):
        ctx.x_channels, ctx.layout = x.shape[1], memory_format(skip)
        return torch.cat([x, skip], dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_skip = grad.split([ctx.x_channels, grad.shape[1] - ctx.x_channels], dim=1)
        return grad_x.contiguous(memory_format=ctx.layout), grad_skip.contiguous(memory_format=ctx.layout)


class UNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        depth, nrb = len(widths), cfg.num_res_blocks
        emb_ch = 4 * cfg.base_channels
        has_attn = [(cfg.res >> level) in cfg.attn_res for level in range(depth)]

        self.time_embed = nn.Sequential(nn.Linear(cfg.base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        # Label num_classes is the null label of classifier-free guidance.
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_ch) if cfg.num_classes else None

        self.stem = nn.Conv2d(cfg.in_channels + cfg.cond_channels, widths[0], 3, padding=1)
        # Channels and level (resolution res / 2^level) of every skip, stem first, in ADM order.
        self.skip_channels, self.skip_levels = [widths[0]], [0]
        self.encoder = nn.ModuleList()
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(nrb):
                self.encoder.append(Block(ch, width, emb_ch, cfg, has_attn[level]))
                ch = width
                self.skip_channels.append(ch)
                self.skip_levels.append(level)
            if level < depth - 1:
                self.encoder.append(Downsample(ch))
                self.skip_channels.append(ch)
                self.skip_levels.append(level + 1)

        self.middle = nn.ModuleList([Block(ch, ch, emb_ch, cfg, attention=True),
                                     Block(ch, ch, emb_ch, cfg, attention=False)])

        self.decoder = nn.ModuleList()
        pending = list(self.skip_channels)
        for level in reversed(range(depth)):
            for i in range(nrb + 1):
                upsample = level > 0 and i == nrb
                self.decoder.append(Block(ch + pending.pop(), widths[level], emb_ch, cfg, has_attn[level], upsample))
                ch = widths[level]

        if cfg.flexi:
            # Level k starts at encoder entry k * (nrb + 1); its input width is that of the skip just before it
            # (the stem for level 0, the previous level's downsample otherwise).
            self.in_adapters = nn.ModuleList(
                adapter(widths[0], self.skip_channels[self.first_skip(k) - 1]) for k in range(cfg.levels))
            self.out_adapters = nn.ModuleList(adapter(widths[k], widths[0]) for k in range(cfg.levels))

        self.head = Head(cfg.norm_groups, widths[0], cfg.in_channels)
        self.graphs = None  # recorded sampling forwards, once record_graphs() is called

    def compile_blocks(self, dense_skip_grads=True, per_channel_norm=True, norm_row_blocks=1, norm_fused_grads=False,
                       **options):
        """Regional compilation: torch.compile each block (residual block, attention, upsample; a downsample; the
        head) on its own. dense_skip_grads: decoder skips joined by JoinSkip, else by torch.cat. per_channel_norm:
        GroupNorm from per-channel statistics, taken over norm_row_blocks blocks of rows, its backward written out
        with norm_fused_grads (see GroupNorm), else torch's own.

        A block always runs at its own level's resolution, whatever the path, so the blocks compile once each and
        every (input, output) path reuses them; blocks of the same shapes share one compiled graph. Compiling the
        whole network instead costs one large graph per path and minutes per path. A decoder block joins its skip
        inside its graph, and the head is compiled too: its GroupNorm, SiLU and convolution fuse. The stem and the
        1x1 adapters stay eager: Dynamo does not trace a torch.nn module (here Conv2d) compiled on its own, and a
        lone convolution has nothing to fuse with.
        """
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if memory_format(self.stem.weight) is torch.channels_last and "backend" not in options:
            # Inductor's heuristic leaves a graph in eager's layout when one of its convolutions has at least twice as
            # many input as output channels (every decoder block's first: it takes the skip), and every backward graph
            # (it holds no forward convolution). GroupNorm's output is channels-first there (its fake tensor says so),
            # so cuDNN would convert to channels-last and back around those convolutions. Forced, every graph keeps
            # the model's channels-last layout.
            options["options"] = {"force_layout_optimization": True}
        for module in self.modules():
            if isinstance(module, Block):
                module.dense_skip_grads = dense_skip_grads
            if isinstance(module, GroupNorm):
                module.per_channel, module.row_blocks = per_channel_norm, norm_row_blocks
                module.fused_grads = norm_fused_grads
        for module in self.regions():
            module.compile(dynamic=False, **options)  # options: torch.compile's (tests use a fast backend)
        return self

    def regions(self):
        """The modules compile_blocks compiles, each on its own."""
        return [m for m in self.modules() if isinstance(m, (Block, Downsample, Head))]

    def record_graphs(self):
        """Sampling: from now on every CUDA forward without gradients replays a CUDA graph, one per input signature,
        recorded at its first call (cuda_graphs.ForwardGraphs). Training forwards, and CPU ones, run as before."""
        self.graphs = ForwardGraphs()
        return self

    def first_skip(self, level):
        """Index in the skip list of the first skip made inside `level` (index 0 is the stem)."""
        return 1 + level * (self.config.num_res_blocks + 1)

    def served_resolutions(self):
        cfg = self.config
        return [cfg.res >> k for k in range(cfg.levels)]

    def path_levels(self, in_res, out_res):
        """(entry level, exit level) of the path in_res -> out_res; raises if the model does not serve it."""
        served = self.served_resolutions()
        if in_res not in served:
            raise ValueError(f"input resolution {in_res}: this model serves {served}")
        if out_res not in (in_res, 2 * in_res) or out_res not in served:
            raise ValueError(f"out_res={out_res} for a {in_res}x{in_res} input: it must be the input resolution "
                             f"or twice it, and one of {served}")
        return served.index(in_res), served.index(out_res)

    def embed(self, t, y):
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels))
        if self.label_embed is not None:
            if y is None:
                y = torch.full_like(t, self.config.num_classes)
            emb = emb + self.label_embed(y)
        # Every FiLM layer of ADM starts with a SiLU of the embedding: apply it once here.
        return F.silu(emb)

    def forward(self, x, t, out_res, y=None, cond=None):
        """x: (B, C, r, r); t: (B,) int64 in 0..T-1; out_res: r or 2r (python int); y: (B,) labels or None;
        cond: (B, cond_channels, r, r) when the config has cond_channels, concatenated to x."""
        if self.graphs is not None and x.is_cuda and not torch.is_grad_enabled():
            return self.graphs(self.network, x, t, out_res, y, cond)  # a replay, recorded at the first call
        return self.network(x, t, out_res, y, cond)

    def network(self, x, t, out_res, y=None, cond=None):
        B, C, H, W = x.shape
        if C != self.config.in_channels or H != W:
            raise ValueError(f"input of shape {tuple(x.shape)}: this model takes square images with "
                             f"{self.config.in_channels} channels, shaped (B, C, r, r)")
        level_in, level_out = self.path_levels(H, out_res)
        if t.shape != (B,):
            raise ValueError(f"t has shape {tuple(t.shape)}; it must hold one timestep per image: ({B},)")
        if self.config.cond_channels:
            if cond is None or cond.shape != (B, self.config.cond_channels, H, W):
                raise ValueError(f"this model takes a conditioning input of shape {(B, self.config.cond_channels, H, W)}"
                                 f", got {None if cond is None else tuple(cond.shape)}")
            x = torch.cat([x, cond.to(x.dtype).contiguous(memory_format=memory_format(x))], dim=1)
        elif cond is not None:
            raise ValueError("cond was given, but this model has cond_channels=0")
        emb = self.embed(t, y)
        if not self.config.flexi:
            return self.forward_full(x, emb, out_res)
        if level_out < level_in and (self.config.upsample_transitions or self.config.upsample_into_full and
                                     level_out == 0):
            # The authors' code routes the step into full resolution through the full-resolution path, on x_t
            # resized up bilinearly (antialias=True, which is plain bilinear when enlarging); their released weights
            # were trained that way (official.py). upsample_transitions does the same at every resolution increase:
            # the step then runs the blocks of its output level's resolution-preserving path, which nearly every
            # batch of that level trains, instead of a route that only the rare transition batches train.
            x = F.interpolate(x, size=(out_res, out_res), mode="bilinear", antialias=True, align_corners=False)
            level_in = level_out

        h = self.in_adapters[level_in](self.stem(x))
        skips = self.zero_skips(h, level_out, level_in)  # none unless the path increases the resolution
        h = self.encode(h, emb, start=self.first_skip(level_in) - 1, skips=skips)
        h = self.decode(h, emb, skips)
        return self.head(self.out_adapters[level_out](h))

    def forward_full(self, x, emb, out_res):
        full = self.config.res
        if x.shape[-1] != full:
            x = F.interpolate(x, size=(full, full), mode="nearest")
        h = self.stem(x)
        skips = [h]
        h = self.decode(self.encode(h, emb, start=0, skips=skips), emb, skips)
        out = self.head(h)
        if out_res != full:
            out = F.interpolate(out, size=(out_res, out_res), mode="bilinear", antialias=True, align_corners=False)
        return out

    def zero_skips(self, h, level_out, level_in):
        """Zeros standing in for the skips of the levels above the entry that the output level's decoder consumes."""
        full, B = self.config.res, h.shape[0]
        indices = range(self.first_skip(level_out), self.first_skip(level_in))
        return [torch.empty(B, self.skip_channels[i], full >> self.skip_levels[i], full >> self.skip_levels[i],
                            dtype=h.dtype, device=h.device, memory_format=memory_format(h)).zero_()  # h's layout,
                for i in indices]                                                              # which cat then keeps

    def encode(self, h, emb, start, skips):
        """Encoder from entry `start` down, pushing every output on `skips`, then the middle block."""
        for block in self.encoder[start:]:
            h = block(h, emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        return h

    def decode(self, h, emb, skips):
        # One decoder block per skip, deepest first: zip stops when the skips run out, which ends the path.
        for block, skip in zip(self.decoder, reversed(skips)):
            h = block(h, emb, skip)
        return h


# -----------------------------------------------------------------------------
# Compute: forward GFLOPs of one image, as torch.utils.flop_counter counts them (2 x multiply-adds), and the values
# its GroupNorms normalise, the memory-bound work: each is read and written at least once.


def meta_model(config):
    """A model of shapes only: no memory, no arithmetic, built and run fast at any size."""
    with torch.device("meta"):
        return UNet(config)


@functools.lru_cache(maxsize=None)
def _path_work(config, in_res, out_res):
    """(forward GFLOPs, GroupNorm values) of one image on a path."""
    model = meta_model(config)
    norm_values = []
    for norm in (m for m in model.modules() if isinstance(m, nn.GroupNorm)):
        norm.register_forward_hook(lambda module, args, out: norm_values.append(args[0].numel()))
    x = torch.zeros(1, config.in_channels, in_res, in_res, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    cond = torch.zeros(1, config.cond_channels, in_res, in_res, device="meta") if config.cond_channels else None
    # The math backend computes attention with two batched matmuls, which the counter sees on every device
    # (it misses the fused CPU kernel).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, t, out_res, cond=cond)
    return counter.get_total_flops() / 1e9, sum(norm_values)


def _shared_config(model, in_res, out_res):
    """The config whose path in_res -> out_res costs what the model's does (checked to be one of its paths)."""
    model.path_levels(in_res, out_res)
    # A path's cost does not depend on how many other levels the model serves: share the count between them.
    return replace(model.config, levels=len(model.config.channel_mult))


def path_gflops(model, in_res, out_res):
    """Forward GFLOPs of one image on the path in_res -> out_res (a training step costs about 3x that).

    Cached per (config, path), so cheap enough to call at every training step for the MFU log. Pass the UNet
    itself or its torch.compile wrapper (not a DDP wrapper: use its .module)."""
    return _path_work(_shared_config(model, in_res, out_res), in_res, out_res)[0]


def path_norm_values(model, in_res, out_res):
    """The values one image's GroupNorms normalise on the path in_res -> out_res (cached as path_gflops)."""
    return _path_work(_shared_config(model, in_res, out_res), in_res, out_res)[1]


def average_gflops(model, scale_space):
    """Forward GFLOPs per image averaged uniformly over the T steps (step_average)."""
    return step_average(path_gflops, model, scale_space)


def average_norm_values(model, scale_space):
    """GroupNorm values per image averaged uniformly over the T steps (step_average)."""
    return step_average(path_norm_values, model, scale_space)


def step_average(path_cost, model, scale_space):
    """path_cost(model, in_res, out_res) averaged over the T steps: at step t the input is at r(t) and the output
    at r(t-1) (full resolution at t = 0)."""
    total = 0.0
    for t in range(scale_space.T):
        out_res = scale_space.res(t - 1) if t > 0 else model.config.res
        total += path_cost(model, scale_space.res(t), out_res)
    return total / scale_space.T


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# python flexi_unet.py: sizes and compute of the paper's models

# The authors' models (paper Table 2): parameters (millions) of the Flexi-UNet; average GFLOPs by number of levels ("full": the ADM UNet).
PAPER_PARAMS = {64: 92.26, 128: 95.23, 256: 124.25}
PAPER_GFLOPS = {64: {"full": 60.05, 1: 56.71, 2: 51.16, 3: 44.82, 4: 38.99},
                128: {"full": 132.30, 1: 117.28, 3: 87.93, 5: 67.24},
                256: {"full": 497.03, 1: 435.47, 3: 318.08, 4: 273.70, 5: 238.42, 6: 210.38}}


def print_paths(res, levels):
    model = meta_model(paper_config(res, levels))
    print(f"Flexi-UNet {res} px, {levels} levels: {parameter_count(model) / 1e6:.2f}M parameters")
    for r in model.served_resolutions():
        for out_res in (r, 2 * r) if r < res else (r,):
            print(f"  {r:4d} -> {out_res:4d}  {path_gflops(model, r, out_res):8.2f} GFLOPs  "
                  f"{path_norm_values(model, r, out_res) / 1e6:6.2f}M GroupNorm values")
    space = ScaleSpace(res, levels)
    print(f"  average over the T steps: {average_gflops(model, space):.2f} GFLOPs  "
          f"{average_norm_values(model, space) / 1e6:6.2f}M GroupNorm values")
    full = meta_model(paper_config(res, 1, flexi=False))
    print(f"Full UNet {res} px: {parameter_count(full) / 1e6:.2f}M parameters, "
          f"{path_gflops(full, res, res):.2f} GFLOPs and {path_norm_values(full, res, res) / 1e6:.2f}M GroupNorm "
          "values at every step")


def print_table():
    print(f"{'res':>4} {'model':>5} {'params':>8} {'paper':>8} {'GFLOPs':>8} {'paper':>8} {'diff':>7}")
    for res, rows in PAPER_GFLOPS.items():
        for levels, paper_gflops in rows.items():
            if levels == "full":
                model = meta_model(paper_config(res, 1, flexi=False))
                name, paper_params, gflops = "full", "-", path_gflops(model, res, res)
            else:
                model = meta_model(paper_config(res, levels))
                name, paper_params = f"{levels}L", f"{PAPER_PARAMS[res]:.2f}M"
                gflops = average_gflops(model, ScaleSpace(res, levels))
            print(f"{res:4d} {name:>5} {parameter_count(model) / 1e6:7.2f}M {paper_params:>8} {gflops:8.2f} "
                  f"{paper_gflops:8.2f} {100 * (gflops / paper_gflops - 1):+6.2f}%")
    print("Full-UNet rows: the authors' figures leave out the attention matrix products (0.55 / 0.55 / 0.72 GFLOPs).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Parameters and forward GFLOPs of the Flexi-UNet (paper Sec. 4.3)")
    parser.add_argument("--res", type=int, default=64, help="full resolution: 64, 128 or 256")
    parser.add_argument("--levels", type=int, default=4, help="number of resolutions served")
    parser.add_argument("--all", action="store_true", help="the table against the authors' models at 64, 128 and 256 px")
    args = parser.parse_args()
    print_table() if args.all else print_paths(args.res, args.levels)
