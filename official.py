"""
The authors' released checkpoints (github.com/prateksha/ScaleSpaceDiffusion, MIT licence) in this project's format.

Their Flexi-UNet is guided-diffusion's ADM UNet with the same Flexi routing as ours (METHOD.md §5), so a converted
file holds exactly their weights under our names. Two rules are more than renames: the channel order of the
attention's qkv projection (qkv_to_ours) and their adapters shared between resolutions (adapter_sources). Their
model routes the step into full resolution through the full-resolution path (UNetConfig.upsample_into_full) and
has the paper's attention (qk_norm=False): unet_config sets both.

    python official.py ssd_64res_celeba_4levels_ema_0.9999_1000000.pt celeba64_4L.pt
    python official.py their_ema.pt out.pt --res 128 --levels 3 --dataset celeba    # a file under another name

Their files are written by guided-diffusion's train_util: {"model": state dict, "step": n} (a bare state dict is
read too). Key layout, ours -> theirs:
    stem                      input_blocks.0.0
    encoder.i  (a Block)      input_blocks.{i+1}: .0 the residual block, .1 its attention
    encoder.i  (a Downsample) input_blocks.{i+1}.0.op
    middle.0 / middle.1       middle_block.0 (+ .1, its attention) / middle_block.2
    decoder.i                 output_blocks.i: .0 residual block, .1 attention, then the upsample (.1 or .2)
    in_adapters.k             adapters_in.{res / 2^k}    out_adapters.k   adapters_out.{res / 2^k}
    head.0 / head.2           out.0 / out.2              label_embed      label_emb
    ResBlock: norm1 in_layers.0, conv1 in_layers.2, film emb_layers.1, norm2 out_layers.0, conv2 out_layers.3,
              skip skip_connection.   Attention: norm, qkv, proj proj_out (1x1 Conv1d there, Linear here).
"""
import argparse
import os
import re
from collections.abc import Mapping

import torch

import methods
from common import read_tensors_file, run_script, save_checkpoint
from flexi_unet import meta_model, paper_config, parameter_count

# -----------------------------------------------------------------------------
# The released models (their README): EMA 0.9999 weights, downloadable from URL + file name.

URL = "https://huggingface.co/prateksha-u/ssd/resolve/main/"
RELEASED = [
    dict(dataset="celeba", res=64, levels=2, steps=1_000_000),
    dict(dataset="celeba", res=64, levels=4, steps=1_000_000),
    dict(dataset="celeba", res=128, levels=3, steps=300_000),
    dict(dataset="celeba", res=128, levels=5, steps=300_000),
    dict(dataset="celeba", res=256, levels=3, steps=300_000),
    dict(dataset="celeba", res=256, levels=6, steps=300_000),
    dict(dataset="imagenet", res=64, levels=2, steps=1_000_000),
]
NAME = re.compile(r"ssd_(?P<res>\d+)res_(?P<dataset>[A-Za-z0-9]+)_(?P<levels>\d+)levels_ema_(?P<rate>[0-9.]+)_"
                  r"(?P<steps>\d+)\.pt")


def file_name(dataset, res, levels, steps, rate="0.9999"):
    return f"ssd_{res}res_{dataset}_{levels}levels_ema_{rate}_{steps}.pt"


def parse_name(path):
    """dict(dataset, res, levels, steps) from a released file name, or None if the name has another pattern."""
    match = NAME.fullmatch(os.path.basename(path))
    if match is None:
        return None
    return dict(dataset=match["dataset"].lower(), res=int(match["res"]), levels=int(match["levels"]),
                steps=int(match["steps"]))


def is_released(dataset, res, levels):
    return any((m["dataset"], m["res"], m["levels"]) == (dataset, res, levels) for m in RELEASED)


# -----------------------------------------------------------------------------
# Recognising their files

# Keys every guided-diffusion ADM UNet has and this project's UNet never has.
SIGNATURE = ("input_blocks.0.0.weight", "middle_block.0.in_layers.0.weight", "out.2.weight")


def their_state_dict(obj):
    """The state dict inside one of their files: train_util writes {"model": state dict, "step": n}."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return obj["model"]
    return obj


def is_official(obj):
    """True for a state dict in the authors' (guided-diffusion) key layout, bare or inside {"model", "step"}."""
    sd = their_state_dict(obj)
    return isinstance(sd, Mapping) and all(isinstance(sd.get(k), torch.Tensor) for k in SIGNATURE)


# -----------------------------------------------------------------------------
# Our config of a released model


def unet_config(res, levels, num_classes=0):
    """Our UNetConfig for one of their models. Their configs/model.yaml is the paper's ADM setting, which
    paper_config holds: 128 channels, 2 residual blocks per level, attention at 16 and 8 px with 4 heads (no fixed
    head width, legacy head order), scale-shift norm, GroupNorm with 32 groups, no dropout at sampling, and their
    channel multipliers per resolution (global_config.py); with their attention and their route into full
    resolution. num_classes > 0 for a class-conditional file (one with label_emb.weight)."""
    return paper_config(res, levels, num_classes=num_classes, qk_norm=False, upsample_into_full=True)


# -----------------------------------------------------------------------------
# Key and tensor mapping

RESBLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "film": "emb_layers.1", "norm2": "out_layers.0",
            "conv2": "out_layers.3", "skip": "skip_connection"}
ATTENTION = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}


def _block_key(prefix, block, rest):
    """Their name of parameter `rest` (e.g. "res.conv1.weight") of one of our Blocks, which is their
    TimestepEmbedSequential `prefix`: [ResBlock, AttentionBlock where the level has one, Upsample if any]."""
    part, module, param = rest.split(".")
    if part == "res":
        return f"{prefix}.0.{RESBLOCK[module]}.{param}"
    if part == "attn":
        return f"{prefix}.1.{ATTENTION[module]}.{param}"
    has_attention = not isinstance(block.attn, torch.nn.Identity)
    return f"{prefix}.{2 if has_attention else 1}.conv.{param}"  # up.conv


def their_key(model, key):
    """Their name of one of our UNet's state-dict keys (see the table at the top)."""
    top, _, rest = key.partition(".")
    full = model.config.res
    if top == "time_embed":
        return key
    if top == "label_embed":
        return f"label_emb.{rest}"
    if top == "stem":
        return f"input_blocks.0.0.{rest}"
    if top == "head":
        return f"out.{rest}"
    index, _, rest = rest.partition(".")
    i = int(index)
    if top == "in_adapters":
        return f"adapters_in.{full >> i}.{rest}"
    if top == "out_adapters":
        return f"adapters_out.{full >> i}.{rest}"
    if top == "encoder":
        block = model.encoder[i]
        if rest.startswith("conv."):  # a Downsample
            return f"input_blocks.{i + 1}.0.op.{rest[len('conv.'):]}"
        return _block_key(f"input_blocks.{i + 1}", block, rest)
    if top == "middle":  # their middle_block is [ResBlock, AttentionBlock, ResBlock]; ours two Blocks
        part, module, param = rest.split(".")
        if part == "res":
            return f"middle_block.{2 * i}.{RESBLOCK[module]}.{param}"
        return f"middle_block.1.{ATTENTION[module]}.{param}"
    if top == "decoder":
        return _block_key(f"output_blocks.{i}", model.decoder[i], rest)
    raise KeyError(f"no rule for {key}")


def qkv_to_ours(tensor, heads):
    """Their legacy attention (QKVAttentionLegacy) splits the 3C qkv channels into heads first, then q, k, v
    within each head: channel = (head, q/k/v, c). Ours splits q, k, v first: channel = (q/k/v, head, c).
    Works on the (3C, C) weight and the (3C,) bias. The softmax scale, 1/sqrt(head dim), is the same. The head
    count cannot be read from the tensors: `heads` must be theirs (4 in every released model)."""
    three_c = tensor.shape[0]
    d = three_c // (3 * heads)
    return tensor.reshape(heads, 3, d, *tensor.shape[1:]).transpose(0, 1).reshape(three_c, *tensor.shape[1:])


def _rules(model):
    """For each of our keys: (their key, their expected shape, function their tensor -> ours)."""
    heads = model.config.num_heads
    rules = {}
    for key, ours in model.state_dict().items():
        shape, convert = tuple(ours.shape), (lambda t: t)
        if ".attn.qkv." in key:
            convert = lambda t, h=heads: qkv_to_ours(t.flatten(1) if t.dim() == 3 else t, h)
            shape = shape + (1,) if len(shape) == 2 else shape  # Conv1d weight (3C, C, 1); bias (3C,)
        elif ".attn.proj.weight" in key:
            convert, shape = (lambda t: t.flatten(1)), shape + (1,)
        elif key == "label_embed.weight":
            # Our last row is the null label of classifier-free guidance; they have none: it gets zeros, the
            # embedding of "no label", which their model never saw (give it labels).
            convert = lambda t: torch.cat([t, t.new_zeros(1, t.shape[1])])
            shape = (shape[0] - 1, shape[1])
        rules[key] = (their_key(model, key), shape, convert)
    return rules


# -----------------------------------------------------------------------------
# Their adapters: one module per channel count, registered under several resolutions


def their_adapters(config):
    """Every 1x1 adapter their FlexiUNet builds (for all encoder levels, served or not), in registration order:
    [(kind, level, resolution, channels)]. adapters_in are registered from the highest resolution down (encoder
    order), adapters_out from the lowest up (decoder order). Levels whose width is the stem's have none."""
    widths = [config.base_channels * m for m in config.channel_mult]
    depth = len(widths)
    ins = [("in", k, config.res >> k, widths[k - 1]) for k in range(1, depth) if widths[k - 1] != widths[0]]
    outs = [("out", k, config.res >> k, widths[k]) for k in reversed(range(1, depth)) if widths[k] != widths[0]]
    return ins + outs


def adapter_sources(config):
    """{their adapter name: the name whose tensors their loader leaves in it}.

    Their FlexiUNet builds one conv per channel count and registers it under every resolution with that count
    (at 256 px: adapters_in.32 = adapters_in.16, adapters_out.64 = adapters_out.32, adapters_out.16 =
    adapters_out.8). The file stores each name separately, and not always with equal tensors: train_util writes
    the EMA weights under the names that model.named_parameters() lists, which gives a shared tensor once (its
    first name), so the other names keep the live training weights. load_state_dict then copies every name in
    registration order into the one shared conv: the last name wins, for every resolution of the group. We take
    that one, so a converted model computes what their sampler computes with the same file.
    """
    groups = {}
    for kind, _, res, ch in their_adapters(config):
        groups.setdefault((kind, ch), []).append(f"adapters_{kind}.{res}")
    return {name: names[-1] for names in groups.values() for name in names}


def shared_copies_that_differ(state_dict, config):
    """[(name, name whose tensors are used instead)] for shared adapters whose stored copies are not equal."""
    sd = their_state_dict(state_dict)
    out = []
    for name, source in adapter_sources(config).items():
        if name != source and all(f"{n}.weight" in sd for n in (name, source)) \
                and not torch.equal(sd[f"{name}.weight"], sd[f"{source}.weight"]):
            out.append((name, source))
    return out


# -----------------------------------------------------------------------------
# Conversion


def _describe(config):
    return f"the {config.res} px Flexi-UNet ({len(config.channel_mult)} encoder levels, " \
           f"{config.base_channels} x {tuple(config.channel_mult)} channels)"


def convert_state_dict(state_dict, config):
    """Their state dict (bare or inside {"model", "step"}) -> the state dict of UNet(config), exactly.

    Checks every tensor their FlexiUNet of this config has: a missing or extra key or a wrong shape raises a
    ValueError that names the expected shapes. Adapters of levels the config does not serve exist in their
    model (it builds them for every encoder level) and are dropped.
    """
    sd = their_state_dict(state_dict)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state dict: expected a mapping of parameter names to tensors")
    model = meta_model(config)
    rules = _rules(model)
    sources = adapter_sources(config)
    adapters = {f"adapters_{kind}.{res}": (config.base_channels * config.channel_mult[0], ch, kind)
                for kind, _, res, ch in their_adapters(config)}

    expected = {name: shape for name, shape, _ in rules.values()}
    for name, (base, ch, kind) in adapters.items():  # served or not, every adapter is in their file
        expected[f"{name}.weight"] = (ch, base, 1, 1) if kind == "in" else (base, ch, 1, 1)
        expected[f"{name}.bias"] = (ch,) if kind == "in" else (base,)

    problems = [f"{k}: shape {tuple(sd[k].shape)}, expected {s}" for k, s in expected.items()
                if k in sd and tuple(sd[k].shape) != s]
    problems += [f"{k}: missing, expected shape {s}" for k, s in expected.items() if k not in sd]
    problems += [f"{k}: not a tensor of {_describe(config)}" for k in sd if k not in expected]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ValueError(f"this state dict does not fit {_describe(config)}, {config.levels} levels: "
                         + "; ".join(problems[:6]) + more)

    out = {}
    for key, (name, _, convert) in rules.items():
        if name.startswith("adapters_"):
            module, _, param = name.rpartition(".")
            name = f"{sources[module]}.{param}"
        out[key] = convert(sd[name].detach().to(torch.float32)).contiguous()
    return out


# -----------------------------------------------------------------------------
# Files


def load_file(path):
    """One of their files, read with weights_only=True: tensors and plain data only, never arbitrary objects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path}: download one of {URL}<file name> (see RELEASED)")
    obj = read_tensors_file(path, "checkpoint")
    sd = their_state_dict(obj)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors (nor {{'model': state dict, 'step': n}}): it holds "
                         f"a {type(sd).__name__}")
    return obj


def _fits_other(sd, res, num_classes):
    """Resolutions of their default UNets other than res that the tensors fit (for the error message)."""
    fits = []
    for other in (64, 128, 256):
        if other != res:
            try:
                convert_state_dict(sd, paper_config(other, 1, num_classes=num_classes))
                fits.append(other)
            except ValueError:
                pass
    return fits


def load_official(path, res=None, levels=None, dataset=None):
    """One of their files -> a checkpoint dict in this project's format (see official_checkpoint)."""
    return official_checkpoint(load_file(path), os.path.basename(path), res, levels, dataset)


def official_checkpoint(obj, source, res=None, levels=None, dataset=None):
    """Their loaded file `obj`, named `source` -> a checkpoint dict in this project's format.

    res, levels and dataset come from the file name (ssd_<res>res_<dataset>_<levels>levels_ema_<rate>_<steps>.pt)
    unless given; levels cannot be read from the tensors (their model holds adapters for every level)."""
    named = parse_name(source) or {}
    res, levels = res or named.get("res"), levels or named.get("levels")
    dataset = (dataset or named.get("dataset") or "celeba").lower()
    if res is None or levels is None:
        raise ValueError(f"{source}: cannot tell the model from the file name (the released ones read "
                         f"ssd_<res>res_<dataset>_<levels>levels_ema_0.9999_<steps>.pt, e.g. "
                         f"{file_name(**RELEASED[1])}); pass res and levels (--res 64 --levels 4)")
    sd = their_state_dict(obj)
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0
    try:
        config = unet_config(res, levels, num_classes)
        ema = convert_state_dict(sd, config)
    except ValueError as e:
        fits = _fits_other(sd, res, num_classes)
        hint = f"; its tensors fit the {' and '.join(map(str, fits))} px model: pass --res {fits[0]}" if fits else ""
        raise ValueError(f"{source}: {e}{hint}") from None
    stored_step = obj.get("step", 0) if obj is not sd else 0
    # Their ssd.yaml and diffusion.yaml: ConvexDecay_0.5 level schedule, BilinearOp (antialiased), a halving ladder,
    # 1000 linear-beta steps, x0 prediction (START_X_RS). Their level rule gives our transitions.
    scale_space = dict(res=res, levels=levels, T=1000, schedule="convex", gamma=0.5, op="bilinear", noise="linear",
                       transitions=None)
    return dict(format=1, spec=methods.ssd_spec("ssd", config, scale_space), ema=ema,
                step=int(named.get("steps", stored_step)), source=source,
                config=dict(dataset=dataset, res=res, levels=levels))


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert one of the authors' released checkpoints to this project's "
                                            f"format (downloads: {URL}<file name>)")
    p.add_argument("src", help="their EMA file, e.g. " + file_name(**RELEASED[1]))
    p.add_argument("dst", help="the converted checkpoint to write")
    p.add_argument("--res", type=int, help="full resolution (default: from the file name)")
    p.add_argument("--levels", type=int, help="number of resolutions (default: from the file name)")
    p.add_argument("--dataset", help="celeba or imagenet (default: from the file name)")
    args = p.parse_args(argv)
    obj = load_file(args.src)
    ckpt = official_checkpoint(obj, os.path.basename(args.src), args.res, args.levels, args.dataset)
    save_checkpoint(args.dst, ckpt)
    config = methods.unet_from_spec(ckpt["spec"]["unet"])
    dataset = ckpt["config"]["dataset"]
    released = "" if is_released(dataset, config.res, config.levels) else " (not a released configuration)"
    classes = f", {config.num_classes} classes" if config.num_classes else ""
    print(f"{ckpt['source']}: {dataset} {config.res} px, {config.levels} levels{classes}{released}, "
          f"{ckpt['step']:,} training steps, {parameter_count(meta_model(config)) / 1e6:.2f}M parameters "
          f"-> {args.dst}")
    for name, source in shared_copies_that_differ(obj, config):
        print(f"  {name} and {source} are one conv in their model and their loader keeps the {source} tensors, "
              f"as here; the file's {name} copy differs (their EMA files hold the EMA weights under a shared "
              f"conv's first name only)")


if __name__ == "__main__":
    run_script(main)
