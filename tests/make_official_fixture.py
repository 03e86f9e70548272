"""
Builds tests/data/official_tiny.pt with the authors' own code: their FlexiUNet (github.com/prateksha/ScaleSpaceDiffusion)
at a tiny size, random weights in their key layout, and what their model and their sampler compute from fixed inputs.
tests/test_official.py checks that official.py plus our UNet and ScaleSpace reproduce it, without their code.

    SSD_OFFICIAL_REPO=PATH/TO/ScaleSpaceDiffusion python tests/make_official_fixture.py

PATH/TO/ScaleSpaceDiffusion is a folder with their source (guided_diffusion/ inside). Their code imports a few
packages it does not use here (torchvision, pandas, omegaconf, blobfile, mpi4py): where one is not installed, an
empty module stands in while their modules are imported.

The tiny model: 16 px, 4 levels, 8 x (1, 2, 2, 2) channels, 2 residual blocks per level (as released, so the block
order inside a level is checked), attention at 4 px with 2 heads, 3 classes. Its widths repeat, so their adapters
are shared between resolutions as in the 256 px models. It uses GroupNorm with 4 groups instead of their 32 (their
normalization() takes no group count; it is swapped while the model is built): the group count sets no weight,
and the released configurations are checked with 32 in test_official.py. Weights are rounded to float16 values
and stored as float16 to keep the file small; every computation runs in float32.
"""
import contextlib
import importlib
import importlib.util
import math
import os
import sys
import types

import torch

if __name__ == "__main__":  # run as a script: the repository's modules are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flexi_unet import UNetConfig  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "official_tiny.pt")
NOT_NEEDED = ("torchvision", "pandas", "omegaconf", "blobfile", "mpi4py")

TINY = dict(image_size=16, levels=4, model_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
            attention_res=(4,), num_heads=2, groups=4, num_classes=3)


def tiny_unet_config(num_classes=0):
    """Our UNetConfig of the tiny model."""
    return UNetConfig(res=TINY["image_size"], levels=TINY["levels"], base_channels=TINY["model_channels"],
                      channel_mult=TINY["channel_mult"], num_res_blocks=TINY["num_res_blocks"],
                      attn_res=TINY["attention_res"], num_heads=TINY["num_heads"], norm_groups=TINY["groups"],
                      num_classes=num_classes)


# -----------------------------------------------------------------------------
# Their code


def import_official(repo=None):
    """Their modules (unet, nn, logger, ssd_utils, scale_space_diffusion, script_util) from the folder `repo`
    (default: $SSD_OFFICIAL_REPO), quiet, with the process group their sampler asks for stubbed out."""
    repo = repo or os.environ.get("SSD_OFFICIAL_REPO")
    if not repo or not os.path.isdir(os.path.join(repo, "guided_diffusion")):
        raise RuntimeError("set SSD_OFFICIAL_REPO to a folder with their source (guided_diffusion/ inside)")
    stubs = [name for name in NOT_NEEDED if importlib.util.find_spec(name) is None]
    for name in stubs:
        sys.modules[name] = types.ModuleType(name)
    if "omegaconf" in stubs:
        sys.modules["omegaconf"].OmegaConf = None  # script_util imports the name; create_model never uses it
    sys.path.insert(0, os.path.abspath(repo))
    try:
        modules = {name: importlib.import_module(f"guided_diffusion.{name}")
                   for name in ("unet", "nn", "logger", "ssd_utils", "scale_space_diffusion", "script_util")}
    finally:
        sys.path.remove(os.path.abspath(repo))
        for name in stubs:
            del sys.modules[name]
    logger = modules["logger"]
    logger.Logger.CURRENT = logger.Logger(dir=None, output_formats=[])  # no log folder, no stdout
    # Their sampler writes debug images on rank 0 and waits at a barrier: one process, no process group.
    modules["scale_space_diffusion"].dist = types.SimpleNamespace(get_rank=lambda: 0, barrier=lambda: None)
    return types.SimpleNamespace(**modules)


@contextlib.contextmanager
def group_norm_groups(official, groups):
    """Their normalization() with `groups` groups instead of 32, while a model is built."""
    original = official.unet.normalization
    official.unet.normalization = lambda channels: official.nn.GroupNorm32(groups, channels)
    try:
        yield
    finally:
        official.unet.normalization = original


def their_tiny_model(official, num_classes=None):
    res, levels = TINY["image_size"], TINY["levels"]
    with group_norm_groups(official, TINY["groups"]):
        return official.unet.FlexiUNet(
            image_size=res, in_channels=3, model_channels=TINY["model_channels"], out_channels=3,
            num_res_blocks=TINY["num_res_blocks"], attention_resolutions=tuple(res // r for r in TINY["attention_res"]),
            channel_mult=TINY["channel_mult"], num_classes=num_classes, num_heads=TINY["num_heads"],
            use_scale_shift_norm=True, unet_res_layer_map={res >> k: res >> k for k in range(levels)}).eval()


def their_diffusion(official, res, levels, channel_mult):
    """Their sampler's diffusion, built as scripts/image_sample.py builds it (configs/ssd.yaml, diffusion.yaml)."""
    ssd_config = dict(ssd_config_flag=True, resolution_schedule="ConvexDecay_0.5",
                      t_res_sampling_mode="one_res_many_t_except_one_t_for_res_change",
                      multires_training_mode="flexi_unet", num_levels=levels, ds_factor=2.0,
                      resize_operator="BilinearOp", scale_max=res,
                      model_channel_mult=",".join(str(m) for m in channel_mult))
    resolutions, layer_map = official.ssd_utils.get_resolutions_array(ssd_config)
    ssd_config.update(scale_min=resolutions[0], unet_res_layer_map=layer_map)
    diffusion = official.script_util.create_gaussian_diffusion(
        diffusion_steps=1000, noise_schedule="linear", predict_xstart=True, experiment_type="ssd",
        ssd_config=ssd_config, resolutions_array=resolutions, mse_loss_weight_type="min_snr_5", image_size=res)
    return diffusion, layer_map


def their_forward(model, x, t, out_res, y=None):
    """Their model on the path x.shape[-1] -> out_res: cond_rs (the output resolution) only when it increases."""
    cond_rs = None if out_res == x.shape[-1] else torch.full((x.shape[0],), float(out_res))
    with torch.no_grad():
        return model(x, t, cond_rs, y=y)


# -----------------------------------------------------------------------------
# Weights


def randomize(model, seed, half=False):
    """Random weights everywhere (theirs start with zero output layers, which would hide every path): convs and
    linears ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2). half: float16 values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = math.prod(p.shape[1:])
                value = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
            else:
                value = torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0)
            p.copy_(value.half().float() if half else value)
    return model


def with_distinct_shared_copies(model, seed, half=False):
    """model.state_dict(), with the names of a shared adapter given different tensors, as in their EMA files
    (EMA weights under the first name, the live ones under the others). Loading it into `model` leaves in every
    shared adapter what their loader keeps."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}  # copies: loading must not change them
    seen = {}
    adapters = [(f"adapters_{kind}.{k}", m) for kind in ("in", "out")
                for k, m in getattr(model, f"adapters_{kind}").items()]
    for name, module in adapters:
        if id(module) in seen:  # a later name of a shared conv
            for param in ("weight", "bias"):
                value = torch.randn(sd[f"{name}.{param}"].shape, generator=g) * 0.3
                sd[f"{name}.{param}"] = value.half().float() if half else value
        seen[id(module)] = name
    model.load_state_dict(sd)
    return sd


# -----------------------------------------------------------------------------
# The fixture


def paths(res, levels):
    """Every (input, output) resolution a Flexi-UNet of `levels` levels serves."""
    return [(res >> k, out) for k in range(levels) for out in ((res >> k, res >> (k - 1)) if k else (res,))]


def sampler_steps(diffusion):
    """Every resolution-changing step, and one step inside each level (its middle) plus T-1."""
    res = [diffusion.get_resolution(t) for t in range(diffusion.num_timesteps)]
    changes = [t for t in range(1, len(res)) if res[t] != res[t - 1]]
    bounds = [0] + changes + [len(res)]
    inside = [(a + b) // 2 for a, b in zip(bounds, bounds[1:])]
    return sorted(set(changes + inside + [len(res) - 1]))


def their_sampler_step(diffusion, model, x_t, t):
    """Their p_mean_variance at step t (unclipped): (prediction, posterior mean)."""
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x_t, torch.full((x_t.shape[0],), t), clip_denoised=False)
    return out["pred_xstart"], out["mean"]


def make_fixture(official):
    res, levels = TINY["image_size"], TINY["levels"]
    cond = randomize(their_tiny_model(official, TINY["num_classes"]), seed=0, half=True)
    sd = with_distinct_shared_copies(cond, seed=1, half=True)
    uncond = their_tiny_model(official)
    uncond.load_state_dict({k: v for k, v in sd.items() if k != "label_emb.weight"})

    g = torch.Generator().manual_seed(2)
    y = torch.tensor([0, 2])
    fixture = {"state_dict": {k: v.half() for k, v in sd.items()}, "y": y, "paths": {}, "sampler": {}}
    for r, out_res in paths(res, levels):
        x = torch.randn(2, 3, r, r, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        fixture["paths"][f"{r}->{out_res}"] = dict(
            x=x, t=t, out=their_forward(uncond, x, t, out_res), out_cond=their_forward(cond, x, t, out_res, y))

    diffusion, _ = their_diffusion(official, res, levels, TINY["channel_mult"])
    fixture["resolution"] = torch.tensor([diffusion.get_resolution(t) for t in range(1000)], dtype=torch.int16)
    for t in sampler_steps(diffusion):
        r = diffusion.get_resolution(t)
        x_t = torch.randn(2, 3, r, r, generator=g)
        pred, mean = their_sampler_step(diffusion, uncond, x_t, t)
        fixture["sampler"][str(t)] = dict(x_t=x_t, pred=pred, mean=mean)
    return fixture


def main():
    fixture = make_fixture(import_official())
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    torch.save(fixture, FIXTURE + ".tmp")
    os.replace(FIXTURE + ".tmp", FIXTURE)
    size = os.path.getsize(FIXTURE)
    print(f"wrote {FIXTURE}: {len(fixture['state_dict'])} tensors of their state dict, {len(fixture['paths'])} "
          f"paths, sampler steps {sorted(map(int, fixture['sampler']))}, {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
