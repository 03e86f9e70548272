"""
MSF, multi-scale factorisation (METHOD.md §7): a comparison baseline for Scale Space Diffusion.

MSF ("Efficient Diffusion Model via Multi-Scale Latent Factorize", 2025) splits an image into a low-resolution base
signal and a full-resolution residual, and models each with a lighter diffusion network. This is a pixel-space
version (project reading; MSF itself works on autoencoder latents):

    base     = D x                          D: antialiased bilinear downsampling res -> res/factor (degrade.py)
    residual = (x - U base) * scale         U: bilinear upsampling res/factor -> res
    x        = U base + residual / scale    exactly

Stage 1 is a one-level DDPM (x0-prediction, Min-SNR) of the base at res/factor; stage 2 a one-level DDPM of the
residual at res, conditioned on U base by channel concatenation: the true one in training, the generated one at
sampling time. Both reuse ScaleSpace(levels=1) and ssd.py unchanged.
"""
import contextlib
import math
from dataclasses import replace

import torch
import torch.nn as nn

import ssd
from degrade import ScaleSpace, Separable, downsample_operator, resize_matrix
from flexi_unet import UNet, paper_config, path_gflops, tiny_config
from methods import Path, unet_from_spec, unet_spec

# Project choice. On CelebA 64 px the residual (factor 2) has std 0.108 against 0.59 for the images: at its natural
# scale its signal-to-noise ratio would be ~30x below the images' at every step, so noise would dominate it from the
# first steps of the schedule. Scaling by 4 brings it near the images' scale, for which the schedule was designed.
RESIDUAL_SCALE = 4.0

# -----------------------------------------------------------------------------
# The factorisation


def factorisation(res, factor=2):
    """(down, up): D from res to res/factor (the SSD degradation, antialiased bilinear) and U back (bilinear)."""
    if factor not in (2, 4):
        raise ValueError(f"MSF factor {factor}: choose 2 or 4 (the base at res/2 or res/4)")
    if res % factor:
        raise ValueError(f"MSF needs a resolution divisible by the factor {factor}, got res={res}")
    up = resize_matrix(res // factor, res)
    return downsample_operator(res, res // factor), Separable(up, up)


def split(x, down, up, scale):
    """x -> (base, residual): the base at low resolution, the detail the base cannot express, scaled."""
    base = down(x)
    return base, (x - up(base)) * scale


def merge(base, residual, up, scale):
    """The inverse of split: exact for any base and residual."""
    return up(base) + residual / scale


# -----------------------------------------------------------------------------
# The two networks


def msf_configs(model, res, in_channels, factor=2, **options):
    """(base_config, residual_config) of the two UNets; the residual one takes U base as cond_channels.

    paper: the base network is the part of the paper's UNet below res/factor (128 channels x its channel_mult
    from there on, same blocks and attention) at res/factor: the network the Flexi-UNet runs on its res/factor
    path, so both methods spend the same FLOPs on a low-resolution step. The residual network is the paper's
    full-resolution UNet at half width (base_channels 64): about a quarter of its FLOPs, the "light" model for
    the detail. Both are one-level Flexi-UNets (flexi=True, levels=1), the family of SSD's 1-level baseline: the
    decoder block that would consume the stem's skip is built but never runs. tiny: small networks for CPU tests.
    """
    common = dict(in_channels=in_channels, flexi=True, **options)  # options: UNetConfig fields (dropout, ...)
    if model == "paper":
        full = paper_config(res, 1, **common)
        skip = int(math.log2(factor))  # the encoder levels above res/factor
        return (replace(full, res=res // factor, channel_mult=full.channel_mult[skip:]),
                replace(full, base_channels=64, cond_channels=in_channels))
    if model == "tiny":
        return (tiny_config(res // factor, 1, **common),
                tiny_config(res, 1, base_channels=16, norm_groups=8, cond_channels=in_channels, **common))
    raise ValueError(f"unknown MSF model {model!r}: choose 'paper' or 'tiny'")


class MSF(nn.Module):
    """The base and residual UNets, with the factorisation that links them."""

    def __init__(self, base_config, residual_config, residual_scale=RESIDUAL_SCALE):
        super().__init__()
        self.res, self.factor = residual_config.res, residual_config.res // base_config.res
        if base_config.res * self.factor != self.res or residual_config.cond_channels != base_config.in_channels:
            raise ValueError("the residual network must run at factor x the base resolution and take the "
                             "upsampled base (in_channels of the base) as cond_channels")
        self.residual_scale = residual_scale
        self.base, self.residual = UNet(base_config), UNet(residual_config)
        self.down, self.up = factorisation(self.res, self.factor)

    def compile_blocks(self, **options):
        self.base.compile_blocks(**options)
        self.residual.compile_blocks(**options)
        return self

    def record_graphs(self):
        self.base.record_graphs()
        self.residual.record_graphs()
        return self

    def gflops(self):
        """Forward GFLOPs per image for one step of each stage: sampling with `steps` steps costs steps x this."""
        low = self.res // self.factor
        return path_gflops(self.base, low, low) + path_gflops(self.residual, self.res, self.res)


def scale_spaces(res, factor, T=1000, noise="linear"):
    """(ss_base, ss_full): plain one-level DDPM processes at res/factor and at res."""
    return ScaleSpace(res // factor, 1, T, noise=noise), ScaleSpace(res, 1, T, noise=noise)


# -----------------------------------------------------------------------------
# Training and sampling


def training_examples(x0, t_base, t_res, ss_base, ss_full, down, up, scale, min_snr=5.0, noise_base=None,
                      noise_res=None):
    """The forward processes of both stages, in float32 (they are exact): a flat tuple of tensors
    (x_t, t, target, weight) of the base, then (x_t, t, target, weight, cond) of the residual, t on the device.

    t_base, t_res: CPU int64 steps (B,), drawn independently: the stages are two separate diffusions. cond is the
    true upsampled base: stage 2 is trained on ground-truth conditioning. down, up, scale: the factorisation.
    """
    base, residual = split(x0, down, up, scale)
    xb_t, target_b, weight_b = ssd.training_example(ss_base, base, t_base, "x0", min_snr, noise_base)
    xr_t, target_r, weight_r = ssd.training_example(ss_full, residual, t_res, "x0", min_snr, noise_res)
    on_device = lambda t: t.to(x0.device, non_blocking=True)
    return xb_t, on_device(t_base), target_b, weight_b, xr_t, on_device(t_res), target_r, weight_r, up(base)


def network_losses(model, examples, y=None, autocast=contextlib.nullcontext()):
    """Per-image losses (loss_base, loss_res), each (B,): x0-prediction with Min-SNR weights on both stages, the
    networks under `autocast`. examples: the tuple of training_examples."""
    xb_t, tb, target_b, weight_b, xr_t, tr, target_r, weight_r, cond = examples
    with autocast:
        pred_b = model.base(xb_t, tb, xb_t.shape[-1], y)
        pred_r = model.residual(xr_t, tr, model.res, y, cond=cond)
    return ssd.weighted_mse(pred_b, target_b, weight_b), ssd.weighted_mse(pred_r, target_r, weight_r)


def training_losses(model, x0, t_base, t_res, ss_base, ss_full, min_snr=5.0, y=None, noise_base=None,
                    noise_res=None, autocast=contextlib.nullcontext()):
    """(loss_base, loss_res) of clean images x0: training_examples, then network_losses."""
    examples = training_examples(x0, t_base, t_res, ss_base, ss_full, model.down, model.up, model.residual_scale,
                                 min_snr, noise_base, noise_res)
    return network_losses(model, examples, y, autocast)


def sample(model, ss_base, ss_full, n, channels, steps=None, method="ancestral", noise=None, y=None, cfg_scale=1.0):
    """Draw n images (n, channels, res, res) in [-1, 1]: the base first, then the residual given U base.

    Each stage takes `steps` respaced steps (all T when None). noise(key, shape) as in ssd.sample.
    """
    noise = noise or ssd.generator_noise()
    base = ssd.sample(ssd.network_denoiser(model.base, ss_base, y, cfg_scale), ss_base, n, channels, steps, method,
                      noise)  # clipped to [-1, 1]: the base is a convex combination of pixels in [-1, 1]
    cond = model.up(base)

    def residual_net(x, t, out_res, labels):
        return model.residual(x, t, out_res, labels, cond=cond)

    # The residual is not in [-1, 1]; |x - U D x| <= 2 since U D has nonnegative weights summing to one, so
    # 2 x scale bounds it as the clip bounds the base.
    bound = 2 * model.residual_scale
    raw = ssd.network_denoiser(residual_net, ss_full, y, cfg_scale, clip=False)
    # ssd.sample uses keys 1..T; shifting stage 2's past them keeps its noise independent of stage 1's even with
    # per-sample seeded noise, where equal keys would give equal noise.
    residual = ssd.sample(lambda x_t, t: raw(x_t, t).clamp(-bound, bound), ss_full, n, channels, steps, method,
                          lambda key, shape: noise(key + ss_base.T + 1, shape))
    return merge(base, residual, model.up, model.residual_scale).clamp(-1, 1)



# -----------------------------------------------------------------------------
# The method interface of methods.py


def msf_spec(base_config, residual_config, T=1000, noise="linear", min_snr=5.0, residual_scale=RESIDUAL_SCALE):
    return dict(method="msf", base=unet_spec(base_config), residual=unet_spec(residual_config), T=T, noise=noise,
                min_snr=min_snr, residual_scale=residual_scale)


NO_X0_UNCERTAINTY = ("the uncertainty of x_0 completes one scale-space chain; an MSF checkpoint samples two separate "
                     "chains: sample it without the uncertainty")


class MSFMethod:
    """MSF behind methods.py's interface. Every batch trains both stages, so it has one path, "msf"; the steps of a
    batch are pairs (t of the residual, t of the base), drawn independently: the stages are separate diffusions."""

    def __init__(self, spec):
        self.spec, self.name = spec, "msf"
        self.base_config, self.residual_config = unet_from_spec(spec["base"]), unet_from_spec(spec["residual"])
        factor = self.residual_config.res // self.base_config.res
        self.ss_base, self.ss = scale_spaces(self.residual_config.res, factor, spec["T"], spec["noise"])
        self.down, self.up = factorisation(self.residual_config.res, factor)
        self.min_snr = spec["min_snr"]
        self.channels, self.num_classes = self.base_config.in_channels, self.base_config.num_classes
        self.paths = [Path("msf", 0, 1.0)]

    def build_model(self):
        return MSF(self.base_config, self.residual_config, self.spec["residual_scale"])

    def draw_steps(self, n, shared, local):
        t_res = ssd.batch_steps(self.ss, n, shared, local)
        t_base = torch.randint(self.ss_base.T, (n,), generator=local)
        return torch.stack([t_res, t_base], dim=1)

    def path_name(self, t):
        return "msf"

    def example(self, x0, t, noise, y=None, channels_last=False):
        shape = lambda res: (x0.shape[0], x0.shape[1], res, res)
        example = training_examples(x0, t[:, 1], t[:, 0], self.ss_base, self.ss, self.down, self.up,
                                    self.spec["residual_scale"], self.min_snr, noise(shape(self.ss_base.sizes[0])),
                                    noise(shape(self.ss.sizes[0])))
        return example + (() if y is None else (y,))

    def loss(self, model, example):
        stages, labels = example[:9], example[9:]  # the nine tensors of training_examples, then the labels
        return sum(network_losses(model, stages, labels[0] if labels else None))

    def path_steps(self, path, n):
        return torch.zeros((n, 2), dtype=torch.long)

    def sample(self, model, n, steps=None, sampler="ancestral", noise=None, y=None, cfg_scale=1.0, record=(),
               x0_error=None):
        if x0_error:
            raise ValueError(NO_X0_UNCERTAINTY)
        if record:
            raise ValueError("--progression shows the states of one scale-space chain; an MSF checkpoint samples two "
                             "separate chains: draw a grid or --outdir instead")
        return sample(model, self.ss_base, self.ss, n, self.channels, steps, sampler, noise, y, cfg_scale)

    def measure_x0_error(self, model, batches, steps=None, at="transitions", generator=None):
        raise ValueError(NO_X0_UNCERTAINTY)

    def gflops(self, model, path):
        return model.gflops()

    def sampling_gflops(self, model, steps=None):
        return len(ssd.sampling_steps(self.ss, steps)) * model.gflops()  # each stage takes `steps` steps

    def warm_up(self, model, n, y=None, cfg_scale=1.0):
        """Two steps of each stage run both networks on every shape they see."""
        noise = ssd.generator_noise(device=next(model.parameters()).device)  # where the networks run
        self.sample(model, n, steps=2, noise=noise, y=y, cfg_scale=cfg_scale)
        return 2
