"""MSF (msf.py): the exact factorisation, both stages training, the two-stage sampler, and the paper-sized compute."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flexi_unet import meta_model, paper_config, path_gflops
from msf import MSF, factorisation, merge, msf_configs, sample, scale_spaces, split, training_losses
from ssd import seeded_noise

RES, FACTOR, C = 16, 2, 3


def tiny_msf(seed=0):
    torch.manual_seed(seed)
    return MSF(*msf_configs("tiny", RES, C, FACTOR))


def randomised(model):
    """Random values in the zero-initialised layers, so that untrained networks depend on their input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


# --- the factorisation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res,factor", [(16, 2), (32, 4)])
def test_factorisation_is_exact_and_uses_bilinear_resizes(res, factor):
    down, up = factorisation(res, factor)
    x = torch.rand(2, 3, res, res, dtype=torch.float64) * 2 - 1
    base, residual = split(x, down, up, 4.0)
    assert base.shape[-1] == res // factor and residual.shape[-1] == res
    assert (merge(base, residual, up, 4.0) - x).abs().max() < 1e-12
    low = res // factor
    expect = F.interpolate(x, size=(low, low), mode="bilinear", antialias=True, align_corners=False)
    assert (base - expect).abs().max() < 1e-12
    # Upsampling with antialias is plain bilinear interpolation: U matches both, at 2x and at 4x.
    for antialias in (False, True):
        expect = F.interpolate(base, size=(res, res), mode="bilinear", antialias=antialias, align_corners=False)
        assert (up(base) - expect).abs().max() < 1e-12


@pytest.mark.parametrize("res,factor", [(16, 2), (32, 4)])
def test_residual_holds_detail_only(res, factor):
    down, up = factorisation(res, factor)
    i = torch.arange(res, dtype=torch.float64)
    _, residual = split(torch.full((1, 1, res, res), 0.3, dtype=torch.float64), down, up, 4.0)
    assert residual.abs().max() < 1e-12  # D and U preserve constants: no residual at all
    # A linear ramp survives D and U exactly where the taps are symmetric: everywhere but the 3/2 factor pixels at
    # the border, where the dropped taps are renormalised.
    ramp = (0.1 * i[:, None] - 0.05 * i[None, :] - 0.2)[None, None]
    _, residual = split(ramp, down, up, 4.0)
    m = 3 * factor // 2
    assert residual[..., m:-m, m:-m].abs().max() < 1e-12 and residual.abs().max() > 1e-3
    # The finest detail, a checkerboard, has no base away from the border: it lies entirely in the residual.
    checker = (1 - 2 * ((i[:, None] + i[None, :]) % 2))[None, None]
    base, _ = split(checker, down, up, 4.0)
    assert base[..., 1:-1, 1:-1].abs().max() < 1e-12


def test_factorisation_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        factorisation(18, 4)
    with pytest.raises(ValueError, match="choose 2 or 4"):
        factorisation(24, 3)
    with pytest.raises(ValueError, match="unknown MSF model"):
        msf_configs("huge", 64, 3)


# --- training ------------------------------------------------------------------------------------------------------


def test_both_stages_learn_and_the_gradients_reach_both_networks():
    model = tiny_msf()
    ss_base, ss_full = scale_spaces(RES, FACTOR)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, C, RES, RES, generator=gen) * 2 - 1
    t_base, t_res = torch.randint(0, 1000, (8,), generator=gen), torch.randint(0, 1000, (8,), generator=gen)
    noise_base = torch.randn(8, C, RES // FACTOR, RES // FACTOR, generator=gen)
    noise_res = torch.randn(8, C, RES, RES, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(30):
        loss_base, loss_res = training_losses(model, x0, t_base, t_res, ss_base, ss_full,
                                              noise_base=noise_base, noise_res=noise_res)
        assert loss_base.shape == loss_res.shape == (8,)
        opt.zero_grad()
        (loss_base.mean() + loss_res.mean()).backward()
        opt.step()
        history.append((loss_base.mean().item(), loss_res.mean().item()))
    print(f"\nMSF losses over 30 steps: base {history[0][0]:.4f} -> {history[-1][0]:.4f}, "
          f"residual {history[0][1]:.4f} -> {history[-1][1]:.4f}")
    assert history[-1][0] < 0.7 * history[0][0] and history[-1][1] < 0.7 * history[0][1]
    assert model.base.stem.weight.grad.abs().sum() > 0
    # The residual network's stem sees the noisy residual and, in its last channels, the upsampled base.
    stem = model.residual.stem.weight.grad
    assert stem[:, :C].abs().sum() > 0 and stem[:, C:].abs().sum() > 0


# --- sampling ------------------------------------------------------------------------------------------------------


def test_sampler_runs_end_to_end_with_per_sample_seeds_and_disjoint_stage_keys():
    model = randomised(tiny_msf()).eval()
    ss_base, ss_full = scale_spaces(RES, FACTOR)
    calls = []

    def recorded(noise):
        def draw(key, shape):
            calls.append((key, shape[-1]))
            return noise(key, shape)
        return draw

    with torch.no_grad():
        four = sample(model, ss_base, ss_full, 4, C, steps=6, noise=recorded(seeded_noise(torch.arange(4))))
        two = sample(model, ss_base, ss_full, 2, C, steps=6, noise=seeded_noise(torch.arange(2)))
    assert four.shape == (4, C, RES, RES) and torch.isfinite(four).all() and four.abs().max() <= 1
    assert four.std() > 0.05  # the randomised networks make images, not a constant
    # Image k depends on its seed only, not on the batch (float32 kernels of another batch size differ by ~2e-5;
    # another seed changes the image by ~0.4 on average).
    assert torch.allclose(four[:2], two, atol=1e-4)
    keys_base = {key for key, size in calls if size == RES // FACTOR}
    keys_res = {key for key, size in calls if size == RES}
    assert len(keys_base) == len(keys_res) == 6 and not keys_base & keys_res


class Oracle(nn.Module):
    """A stand-in network returning a fixed output; the residual one returns the residual of a fixed image given
    whatever conditioning it is handed, so that the image comes out only if that conditioning is U base."""

    def __init__(self, out, image=None, scale=None):
        super().__init__()
        self.out, self.image, self.scale = out, image, scale

    def forward(self, x, t, out_res, y=None, cond=None):
        if self.image is None:
            return self.out.expand(x.shape[0], -1, -1, -1)
        return (self.image - cond) * self.scale


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_sampler_with_oracle_networks_returns_the_image(method):
    model = tiny_msf()
    ss_base, ss_full = scale_spaces(RES, FACTOR)
    image = torch.rand(1, C, RES, RES, generator=torch.Generator().manual_seed(3)) * 1.8 - 0.9
    base, _ = split(image, model.down, model.up, model.residual_scale)
    model.base, model.residual = Oracle(base), Oracle(None, image, model.residual_scale)
    out = sample(model, ss_base, ss_full, 2, C, steps=4, method=method)
    assert (out - image).abs().max() < 1e-5


# --- configurations and compute ------------------------------------------------------------------------------------


def test_configs_and_paper_compute():
    base_config, residual_config = msf_configs("paper", 64, 3, num_classes=10, dropout=0.1)
    assert residual_config.cond_channels == 3 and base_config.cond_channels == 0
    assert base_config.res == 32 and residual_config.res == 64 and base_config.num_classes == 10
    assert base_config.dropout == residual_config.dropout == 0.1
    assert msf_configs("paper", 64, 3, factor=4)[0].channel_mult == (3, 4)
    with torch.device("meta"):
        msf = MSF(base_config, residual_config)
        msf4 = MSF(*msf_configs("paper", 64, 3, factor=4))
    assert msf.compile_blocks() is msf
    flexi_32 = path_gflops(meta_model(paper_config(64, 4)), 32, 32)
    full = path_gflops(meta_model(paper_config(64, 1, flexi=False)), 64, 64)
    base = path_gflops(msf.base, 32, 32)
    residual = path_gflops(msf.residual, 64, 64)
    print(f"\nGFLOPs at 64 px: MSF base {base:.2f} (Flexi-UNet 32->32 path {flexi_32:.2f}), residual {residual:.2f}, "
          f"total {msf.gflops():.2f}; factor 4 total {msf4.gflops():.2f}; full UNet {full:.2f}")
    assert msf.gflops() == pytest.approx(base + residual)
    # The base is the Flexi-UNet's 32 px sub-network; its stem and head are 256 channels wide where the Flexi path
    # has a 128-channel stem and head plus 1x1 adapters: within 2% of the same compute.
    assert base / flexi_32 == pytest.approx(1.0, abs=0.02)
    assert 0.2 < residual / full < 0.3  # half width: about a quarter of the FLOPs
    assert msf4.gflops() < msf.gflops() < full
