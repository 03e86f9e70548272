"""
The methods this project trains and samples, behind one interface, so that train.py, sample.py and bench.py never
ask which one they hold (METHOD.md §3, §7):

    ssd        Scale Space Diffusion: the Flexi-UNet over the resolution ladder
    ddpm_x0    DDPM on the full ADM UNet with x0-prediction: SSD with one level
    ddpm_eps   the same with eps-prediction
    msf        the two-stage multi-scale factorisation baseline (msf.py)

A method is built from its spec: plain data (strings, numbers, lists, dicts) that a checkpoint stores, so that a
checkpoint rebuilds its network and its process with flexi_unet.py and degrade.py alone. Its interface:

    method.build_model()                 the network (an nn.Module)
    method.channels, method.num_classes  of the images, and of the labels (0: unconditional)
    method.paths                         every path a training batch can take, with its share of batches
    method.draw_steps(n, shared, local)  the steps t of one batch (CPU int64), all on one path
    method.path_name(t)                  "64->64": input resolution -> output resolution
    method.path_steps(path, n)           the steps of a batch of n on a path
    method.example(x0, t, noise, y)      the network's inputs, targets and labels: a tuple of tensors, in float32
                                         (the forward process is exact)
    method.loss(model, example)          per-image losses (B,)
    method.sample(model, n, ...)         images at full resolution in [-1, 1]
    method.measure_x0_error(model, ...)  the network's error, for sampling with the uncertainty of x_0 (ssd.draw_x0)
    method.gflops(model, path)           forward GFLOPs per image on a path
    method.sampling_gflops(model, steps) forward GFLOPs per image of one sampling chain
"""
import dataclasses
import inspect
from dataclasses import dataclass

import torch

import ssd
from degrade import ScaleSpace
from flexi_unet import UNet, UNetConfig, path_gflops

NAMES = ("ssd", "ddpm_x0", "ddpm_eps", "msf")


@dataclass(frozen=True)
class Path:
    name: str      # "input resolution->output resolution", e.g. "32->64"
    step: int      # a step t on this path: every step of a path runs the same network blocks on the same shapes
    share: float   # share of training batches


def unet_spec(config):
    """A UNetConfig as plain data."""
    return dataclasses.asdict(config)


def unet_from_spec(spec):
    return UNetConfig(**spec)


class ScaleSpaceMethod:
    """SSD, and DDPM as its one-level case: one UNet, one ScaleSpace, x0- or eps-prediction with Min-SNR weights."""

    def __init__(self, spec):
        self.spec = spec
        self.name = spec["method"]
        self.unet = unet_from_spec(spec["unet"])
        self.ss = ScaleSpace(**spec["scale_space"])
        self.parameterisation = spec["parameterisation"]
        self.min_snr = spec["min_snr"]
        self.transition_share = spec.get("transition_share")
        self.level_shares = spec.get("level_shares")  # relative, finest level first; None: by number of steps
        self.channels, self.num_classes = self.unet.in_channels, self.unet.num_classes
        self.paths = self._paths()

    def _paths(self):
        """One path per level (its resolution-preserving steps), and one per resolution change."""
        share = (self.ss.levels - 1) / self.ss.T if self.transition_share is None else self.transition_share
        inner = ssd.inner_steps(self.ss)
        if self.level_shares is not None and not all(len(steps) for steps in inner):
            raise ValueError("--level_shares: a level has no resolution-preserving steps (two transitions are "
                             "adjacent); give transitions further apart, or leave --level_shares out")
        weights = self.level_shares or [len(steps) for steps in inner]
        paths = [Path(self.path_name(int(steps[0])), int(steps[0]), (1 - share) * w / sum(weights))
                 for steps, w in zip(inner, weights) if len(steps)]
        paths += [Path(self.path_name(t), t, share / len(self.ss.transitions)) for t in self.ss.transitions]
        return paths

    def build_model(self):
        return UNet(self.unet)

    def draw_steps(self, n, shared, local):
        return ssd.batch_steps(self.ss, n, shared, local, self.transition_share, self.level_shares)

    def path_name(self, t):
        return f"{self.ss.res(t)}->{self.out_res(t)}"

    def out_res(self, t):
        return self.ss.sizes[self.ss.target_level(t)]

    def example(self, x0, t, noise, y=None, channels_last=False):
        """(x_t, t on the device, target, Min-SNR weight[, labels]); noise(shape) draws unit Gaussian noise."""
        x_t, target, weight = ssd.training_example(self.ss, x0, t, self.parameterisation, self.min_snr,
                                                   noise((x0.shape[0], x0.shape[1], self.ss.res(t), self.ss.res(t))))
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return (x_t, t.to(x0.device, non_blocking=True), target, weight) + (() if y is None else (y,))

    def loss(self, model, example):
        x_t, t, target, weight, *y = example
        # The target lives at the output resolution: its shape says which path to run, with no look-up of t.
        return ssd.weighted_mse(model(x_t, t, target.shape[-1], *y), target, weight)

    def path_steps(self, path, n):
        """The steps of a batch of n on a path."""
        return torch.full((n,), path.step, dtype=torch.long)

    def sample(self, model, n, steps=None, sampler="ancestral", noise=None, y=None, cfg_scale=1.0, record=(),
               x0_error=None):
        denoise = ssd.network_denoiser(model, self.ss, y, cfg_scale, self.parameterisation)
        return ssd.sample(denoise, self.ss, n, self.channels, steps, sampler, noise, record, x0_error)

    def measure_x0_error(self, model, batches, steps=None, at="transitions", generator=None):
        """The unconditional network's error on clean images (ssd.measure_x0_error), for sample(x0_error=...)."""
        if self.num_classes:
            raise ValueError("the uncertainty of x_0 is measured for unconditional models; this one is "
                             "class-conditional: sample without it")
        denoise = ssd.network_denoiser(model, self.ss, None, 1.0, self.parameterisation)
        return ssd.measure_x0_error(denoise, self.ss, batches, steps, at, generator)

    def gflops(self, model, path):
        in_res, out_res = map(int, path.name.split("->"))
        return path_gflops(model, in_res, out_res)

    def sampling_gflops(self, model, steps=None):
        """Forward GFLOPs per image of one sampling chain of `steps` respaced steps (all T when None)."""
        return sum(path_gflops(model, self.ss.res(t), self.out_res(t)) for t in ssd.sampling_steps(self.ss, steps))

    def warm_up(self, model, n, y=None, cfg_scale=1.0):
        """Run the network once on every path, so that compilation happens before sampling is timed."""
        denoise = ssd.network_denoiser(model, self.ss, y, cfg_scale, self.parameterisation)
        device = next(model.parameters()).device
        for path in self.paths:
            res = self.ss.res(path.step)
            denoise(torch.zeros(n, self.channels, res, res, device=device), path.step)
        return len(self.paths)


def ssd_spec(method, unet_config, scale_space, min_snr=5.0, transition_share=None, level_shares=None):
    """The spec of ssd, ddpm_x0 or ddpm_eps: scale_space holds ScaleSpace's arguments; level_shares, if given, the
    relative shares of batches of the levels' resolution-preserving paths, finest first (normalised here)."""
    parameterisation = "eps" if method == "ddpm_eps" else "x0"
    if level_shares is not None:
        level_shares = [w / sum(level_shares) for w in level_shares]
    return dict(method=method, unet=unet_spec(unet_config), scale_space=dict(scale_space),
                parameterisation=parameterisation, min_snr=min_snr, transition_share=transition_share,
                level_shares=level_shares)


def completed(spec):
    """A checkpoint's spec with the settings added since it was written filled in by their defaults. Every option
    added to UNetConfig, ScaleSpace or the batch rule defaults to the behaviour before it existed, so the completed
    spec describes the method the checkpoint was trained as, and compares equal to the spec of the same run today."""
    spec = dict(spec)
    for key in ("unet", "base", "residual"):  # the networks of ssd and ddpm, and of msf's two stages
        if key in spec:
            spec[key] = unet_spec(unet_from_spec(spec[key]))
    if "scale_space" in spec:  # ssd and ddpm: the process's options, and the batch rule's (None: the paper's)
        defaults = {name: p.default for name, p in inspect.signature(ScaleSpace).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        spec["scale_space"] = {**defaults, **spec["scale_space"]}
        spec = {"transition_share": None, "level_shares": None, **spec}
    return spec


def from_spec(spec):
    """The method a spec describes (a checkpoint's "spec")."""
    name = spec.get("method")
    if name in ("ssd", "ddpm_x0", "ddpm_eps"):
        return ScaleSpaceMethod(spec)
    if name == "msf":
        import msf  # msf.py builds on this module
        return msf.MSFMethod(spec)
    raise ValueError(f"unknown method {name!r}: choose one of {', '.join(NAMES)}")
