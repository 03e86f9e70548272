"""The loss and the samplers of ssd.py, end to end on Gaussian data whose ideal denoiser is known."""
import math

import pytest
import torch

import ssd
from degrade import ScaleSpace
from sampler_bias import exact_output_moments, ideal_denoiser, ideal_x0_error
from ssd import (batch_steps, generator_noise, inner_steps, network_denoiser, sample, sampling_steps,
                 seeded_noise, training_example, weighted_mse)

# --- Gaussian data: x_0 ~ N(m, C) on 8x8 single-channel images, a smooth mean and a smooth covariance -------------

SIZE = 8


def gaussian_data():
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).double()
    cov = 0.2 * torch.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * 1.5 ** 2)) + 0.02 * torch.eye(SIZE ** 2)
    mean = 0.4 * torch.sin(pos[:, 0] / 2) * torch.cos(pos[:, 1] / 3)
    return mean, cov


def relative_error(estimate, truth):
    return float((estimate - truth).norm() / truth.norm())


@pytest.fixture(scope="module")
def gaussian():
    ss = ScaleSpace(SIZE, 3)  # 8 -> 4 -> 2
    mean, cov = gaussian_data()
    return ss, mean, cov, ideal_denoiser(ss, mean, cov)


def test_ancestral_sampler_reproduces_gaussian_data(gaussian):
    """All 1000 exact posterior steps: the output law equals the data's up to the plug-in (fixed-small) bias."""
    ss, mean, cov, denoise = gaussian
    out_mean, out_cov = exact_output_moments(ss, denoise)
    assert (out_mean - mean).abs().max() < 1e-5
    assert relative_error(out_cov, cov) < 0.02  # measured 0.0115: the uncertainty of x_0 that the plug-in ignores
    # The same check fails when the resolution-increasing steps use isotropic noise (paper supplement, Fig. 10).
    ss_iso = ScaleSpace(SIZE, 3)
    iso = lambda xi, t, s=None: float(ss_iso.sigma[s]) * math.sqrt(1 - ss_iso.pair(t, s)[1] * ss_iso.pair(t, s)[0] ** 2) * xi
    ss_iso.posterior_noise = iso
    _, iso_cov = exact_output_moments(ss_iso, ideal_denoiser(ss_iso, mean, cov))
    assert relative_error(iso_cov, cov) > 0.04  # measured 0.061, five times the exact sampler's error


@pytest.mark.parametrize("steps,bound", [(250, 0.05), (100, 0.1)])
def test_respaced_sampler(gaussian, steps, bound):
    """Respaced steps (composed operators, c = sqrt(abar_t / abar_s)): exact mean, covariance within the bound."""
    ss, mean, cov, denoise = gaussian
    out_mean, out_cov = exact_output_moments(ss, denoise, steps=steps)
    assert (out_mean - mean).abs().max() < 1e-5
    assert relative_error(out_cov, cov) < bound  # measured 0.035 (250 steps) and 0.078 (100 steps)


def test_ddim_sampler(gaussian):
    ss, mean, cov, denoise = gaussian
    out_mean, out_cov = exact_output_moments(ss, denoise, method="ddim", steps=100)
    assert (out_mean - mean).abs().max() < 2e-3
    assert relative_error(out_cov, cov) < 0.1  # measured 0.052 at 100 steps


@pytest.mark.parametrize("method,steps", [("ancestral", None), ("ddim", 50)])
def test_sample_loop_matches_exact_moments(gaussian, method, steps):
    """Monte Carlo through sample(): the samples have the moments that the exact propagation predicts."""
    ss, mean, cov, denoise = gaussian
    n = 3000
    x = sample(denoise, ss, n, 1, steps=steps, method=method,
               noise=generator_noise(torch.Generator().manual_seed(1)))
    assert x.shape == (n, 1, SIZE, SIZE)
    exact_mean, exact_cov = exact_output_moments(ss, denoise, method, steps)
    flat = x.flatten(1).double()
    z = (flat.mean(0) - exact_mean) / (exact_cov.diag() / n).sqrt()
    assert z.abs().max() < 4.5
    # Expected Frobenius error of a sample covariance: sqrt((tr C)^2 + tr C^2) / sqrt(n).
    mc = math.sqrt(exact_cov.trace() ** 2 + (exact_cov @ exact_cov).trace()) / math.sqrt(n)
    assert float((torch.cov(flat.T) - exact_cov).norm()) < 3 * mc


@pytest.mark.parametrize("method,steps,bound", [("ancestral", None, 0.02), ("ancestral", 100, 0.1),
                                                ("ddim", 100, 0.1)])
def test_samplers_with_preserve_snr_reproduce_gaussian_data(method, steps, bound):
    """The same end-to-end check with the signal scaled at every resolution change (preserve_snr): the ideal
    denoiser sees x_t = g a_t R x_0 + sigma_t eps, and the samplers' output law is the data's."""
    ss = ScaleSpace(SIZE, 3, preserve_snr=True)
    mean, cov = gaussian_data()
    out_mean, out_cov = exact_output_moments(ss, ideal_denoiser(ss, mean, cov), method, steps)
    # The start x_{T-1} ~ N(0, I) ignores the signal a_{T-1} R m that is left there, which the gains make larger (16x
    # the paper's SNR at T-1 on the 2 px level): a mean error of 1e-5 instead of 1e-6.
    assert (out_mean - mean).abs().max() < (5e-5 if method == "ancestral" else 2e-3)
    error = relative_error(out_cov, cov)
    print(f"\npreserve_snr, {method}, {steps or 1000} steps: covariance error {error:.4f}")
    assert error < bound


def test_sample_records_progression(gaussian):
    ss, _, _, denoise = gaussian
    x, frames = sample(denoise, ss, 4, 1, steps=20, record={999, 0})
    assert [t for t, _, _ in frames] == [999, 0]
    assert frames[0][1].shape[-1] == 2 and frames[-1][2].shape[-1] == SIZE and torch.equal(frames[-1][2], x)


# --- the uncertainty of x_0 (ssd.draw_x0) --------------------------------------------------------------------------

def image_like_covariance():
    """Correlation falling exponentially with distance (3 px): a power-law spectrum, as photographs have."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).double()
    return 0.25 * torch.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1).sqrt() / 3)


@pytest.mark.parametrize("steps,at,plain,bound", [(None, "transitions", 0.02, 0.01), (100, "all", 0.07, 0.001)])
def test_x0_uncertainty_brings_the_sampler_to_the_data(steps, at, plain, bound):
    """On image-like data with the ideal denoiser, whose error covariance is known: the plug-in error of the
    resolution changes is most of the 1000-step sampler's error, and drawing x_0 there removes it; drawn at every
    step of a 100-step sampler, the output law is the data's."""
    ss, mean, cov = ScaleSpace(SIZE, 3), gaussian_data()[0], image_like_covariance()
    denoise = ideal_denoiser(ss, mean, cov)
    _, out_cov = exact_output_moments(ss, denoise, steps=steps)
    errors = ideal_x0_error(ss, cov, steps, at)
    out_mean, drawn_cov = exact_output_moments(ss, denoise, steps=steps, x0_error=errors)
    assert (out_mean - mean).abs().max() < 1e-5  # the draws have mean zero: the mean stays exact
    assert relative_error(out_cov, cov) > plain  # measured 0.022 (1000 steps) and 0.077 (100 steps)
    assert relative_error(drawn_cov, cov) < bound  # measured 0.0070 (a 1-level sampler's error) and 0.00014


@pytest.mark.parametrize("steps", [None, 100])
def test_x0_uncertainty_at_the_transitions_brings_ddim_to_one_levels_error(steps):
    """The DDIM-style step keeps q(x_s | x_0), so x_0 drawn at the resolution changes mends them as it mends the
    ancestral step's: the 3-level DDIM sampler comes down to the 1-level one's own error, and drawn at every step
    to the data."""
    ss, mean, cov = ScaleSpace(SIZE, 3), gaussian_data()[0], image_like_covariance()
    one_level = ScaleSpace(SIZE, 1)
    _, ddpm_cov = exact_output_moments(one_level, ideal_denoiser(one_level, mean, cov), "ddim", steps)
    denoise = ideal_denoiser(ss, mean, cov)
    _, plain_cov = exact_output_moments(ss, denoise, "ddim", steps)
    _, drawn_cov = exact_output_moments(ss, denoise, "ddim", steps, ideal_x0_error(ss, cov, steps, "transitions"))
    _, exact_cov = exact_output_moments(ss, denoise, "ddim", steps, ideal_x0_error(ss, cov, steps, "all"))
    ddpm = relative_error(ddpm_cov, cov)  # measured 0.0034 (1000 steps) and 0.032 (100 steps)
    assert relative_error(plain_cov, cov) > 1.5 * ddpm  # measured 0.042 and 0.065
    assert relative_error(drawn_cov, cov) < ddpm  # measured 0.0029 and 0.029
    assert relative_error(exact_cov, cov) < 0.001  # measured 0.00013


def test_measure_x0_error_finds_the_ideal_denoisers_error():
    ss, mean, cov = ScaleSpace(SIZE, 3), gaussian_data()[0], image_like_covariance()
    root = torch.linalg.cholesky(cov)
    draws = torch.Generator().manual_seed(0)
    draw = lambda: mean + torch.randn(2000, SIZE * SIZE, generator=draws, dtype=torch.float64) @ root.T
    batches = [draw().view(-1, 1, SIZE, SIZE) for _ in range(4)]
    measured = ssd.measure_x0_error(ideal_denoiser(ss, mean, cov), ss, batches, 20, "all", draws)
    exact = ideal_x0_error(ss, cov, 20, "all")
    assert list(measured) == list(exact) == [t for t in sampling_steps(ss, 20) if t > 0]
    assert all(len(measured[t]) == 8000 and measured[t].shape[1:] == exact[t].shape[1:] for t in exact)
    second_moment = lambda errors: errors.flatten(1).T @ errors.flatten(1) / len(errors)
    # 8,000 images estimate the error covariance within about sqrt(64 / 8000) = 9% (measured at most 8.6%)
    assert max(relative_error(second_moment(measured[t]), second_moment(exact[t])) for t in exact) < 0.12
    assert sorted(ssd.measure_x0_error(ideal_denoiser(ss, mean, cov), ss, batches[:1])) == ss.transitions


def test_sample_loop_draws_the_x0_uncertainty():
    """Monte Carlo through sample(): with the x_0 uncertainty the samples have the moments the exact propagation
    predicts (so the loop draws it at the right steps, with its own noise)."""
    ss, mean, cov = ScaleSpace(SIZE, 3), gaussian_data()[0], image_like_covariance()
    denoise, errors = ideal_denoiser(ss, mean, cov), ideal_x0_error(ss, cov, 50, "all")
    n = 3000
    x = sample(denoise, ss, n, 1, steps=50, noise=generator_noise(torch.Generator().manual_seed(2)), x0_error=errors)
    exact_mean, exact_cov = exact_output_moments(ss, denoise, steps=50, x0_error=errors)
    flat = x.flatten(1).double()
    assert ((flat.mean(0) - exact_mean) / (exact_cov.diag() / n).sqrt()).abs().max() < 4.5
    mc = math.sqrt(exact_cov.trace() ** 2 + (exact_cov @ exact_cov).trace()) / math.sqrt(n)
    assert float((torch.cov(flat.T) - exact_cov).norm()) < 3 * mc
    with pytest.raises(ValueError, match="choose 'transitions' or 'all'"):
        ssd.uncertain_steps(ss, 50, "every")


# --- respacing ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels,steps", [(4, 100), (4, 250), (4, 10), (1, 50), (6, 20)])
def test_sampling_steps_keep_every_transition(levels, steps):
    ss = ScaleSpace(256, levels)
    kept = sampling_steps(ss, steps)
    assert len(kept) == steps and kept == sorted(set(kept), reverse=True)
    assert kept[0] == ss.T - 1 and kept[-1] == 0 and set(ss.transitions) <= set(kept)
    with pytest.raises(ValueError, match="at least"):
        sampling_steps(ScaleSpace(64, 4), 4)


# --- training -------------------------------------------------------------------------------------------------------

def test_batch_steps_rule():
    ss = ScaleSpace(64, 4)
    shared, local = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    draws = [batch_steps(ss, 16, shared, local) for _ in range(3000)]
    for t in draws:
        assert len({ss.level_of(int(s)) for s in t}) == 1  # one input resolution per batch
        assert len({ss.target_level(int(s)) for s in t}) == 1  # and one output resolution
    transitions = sum(int(t[0]) in ss.transitions for t in draws)
    assert transitions < 20  # the paper's rule: each transition gets 1/T of the batches, 9 expected here
    # Inside levels the share of batches follows the number of steps (level 0: 437 of 997 inner steps).
    level0 = sum(ss.level_of(int(t[0])) == 0 and int(t[0]) not in ss.transitions for t in draws) / len(draws)
    assert level0 == pytest.approx(437 / 997, abs=0.03)
    shared = torch.Generator().manual_seed(0)
    boosted = [batch_steps(ss, 4, shared, local, transition_share=0.1) for _ in range(2000)]
    assert sum(int(t[0]) in ss.transitions for t in boosted) / 2000 == pytest.approx(0.1, abs=0.02)
    assert sum(len(s) for s in inner_steps(ss)) == ss.T - len(ss.transitions)


def test_ranks_share_the_level_sequence():
    """Two DDP ranks: same shared seed, different local seeds -> same levels, different per-image steps."""
    ss = ScaleSpace(64, 4)
    ranks = [(torch.Generator().manual_seed(7), torch.Generator().manual_seed(100 + r)) for r in range(2)]
    seq = [[batch_steps(ss, 8, *gens, transition_share=0.05) for _ in range(300)] for gens in ranks]
    assert [ss.level_of(t) for t in seq[0]] == [ss.level_of(t) for t in seq[1]]
    assert [ss.target_level(t) for t in seq[0]] == [ss.target_level(t) for t in seq[1]]
    assert any(not torch.equal(a, b) for a, b in zip(*seq))


def test_training_example_targets_and_weights():
    ss = ScaleSpace(16, 3)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.full((4,), ss.transitions[0])
    x_t, target, weight = training_example(ss, x0, t)
    assert x_t.shape[-1] == 8 and target.shape[-1] == 16 and torch.equal(target, x0)
    assert torch.allclose(weight, ss.snr[t].clamp(max=5).float())
    t = torch.full((4,), 700)
    x_t, target, _ = training_example(ss, x0, t)
    assert torch.allclose(target, ss.cumulative[1](x0)) and x_t.shape[-1] == 8
    loss = weighted_mse(target + 0.1, target, torch.ones(4))
    assert torch.allclose(loss, torch.full((4,), 0.01))
    base = ScaleSpace(16, 1)
    noise = torch.randn(4, 3, 16, 16)
    _, target, weight = training_example(base, x0, t, parameterisation="eps", noise=noise)
    assert torch.equal(target, noise) and torch.allclose(weight, (base.snr[t].clamp(max=5) / base.snr[t]).float())
    with pytest.raises(ValueError, match="one-level"):
        training_example(ss, x0, t, parameterisation="eps")


# --- noise and the network wrapper -----------------------------------------------------------------------------------

def test_seeded_noise_is_per_image_and_gaussian():
    a = seeded_noise(torch.arange(0, 6))(3, (6, 3, 8, 8))
    b = seeded_noise(torch.arange(4, 8))(3, (4, 3, 8, 8))
    assert torch.equal(a[4:], b[:2])  # image k is the same whatever the batch
    assert not torch.equal(seeded_noise(torch.arange(2))(4, (2, 3, 8, 8)), seeded_noise(torch.arange(2))(3, (2, 3, 8, 8)))
    z = seeded_noise(torch.arange(500))(11, (500, 1, 32, 32)).double()
    n = z.numel()
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.var() - 1) < 6 * math.sqrt(2 / n)
    assert abs((z ** 4).mean() - 3) < 0.05  # Gaussian kurtosis
    corr = torch.corrcoef(z.flatten(1)[:, :256])
    assert (corr - torch.eye(500, dtype=torch.float64)).abs().max() < 0.3


def test_fused_noise_is_one_graph_of_the_same_arithmetic():
    """box_muller traces whole (fullgraph: no Python in the middle), so Inductor can make it one kernel; traced, it
    gives the eager values bit for bit. On the CPU fused=True draws the eager noise (fusing is for CUDA)."""
    stream = torch.tensor([0, 1, 2 ** 32 - 1, 123456789], dtype=torch.int64)
    traced = torch.compile(ssd.box_muller, backend="aot_eager", dynamic=False, fullgraph=True)
    assert torch.equal(traced(stream, 48), ssd.box_muller(stream, 48))
    seeds = torch.arange(3)
    assert torch.equal(seeded_noise(seeds, fused=True)(7, (3, 3, 4, 4)), seeded_noise(seeds)(7, (3, 3, 4, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel is made for CUDA")
def test_fused_noise_on_cuda_equals_the_eager_noise():
    seeds = torch.arange(1000, device="cuda")
    for shape in ((1000, 3, 64, 64), (1000, 3, 8, 8)):
        assert torch.equal(seeded_noise(seeds, fused=True)(5, shape), seeded_noise(seeds)(5, shape))


def test_network_denoiser_routes_resolutions_and_parameterisations():
    ss = ScaleSpace(16, 3)
    calls = []

    def net(x, t, out_res, y):
        calls.append((x.shape[-1], out_res, int(t[0]), y))
        return torch.full((x.shape[0], 3, out_res, out_res), 2.0 if y is None else 0.5)

    denoise = network_denoiser(net, ss)
    assert denoise(torch.zeros(2, 3, 8, 8), ss.transitions[0]).shape[-1] == 16
    assert calls[-1][:3] == (8, 16, ss.transitions[0])
    assert denoise(torch.zeros(2, 3, 16, 16), 5).max() == 1  # clamped to [-1, 1]
    guided = network_denoiser(net, ss, y=torch.tensor([1, 2]), cfg_scale=3.0, clip=False)
    assert torch.allclose(guided(torch.zeros(2, 3, 16, 16), 5), torch.tensor(2.0 + 3 * (0.5 - 2.0)))
    base = ScaleSpace(16, 1)
    eps = network_denoiser(lambda x, t, r, y: torch.ones_like(x), base, parameterisation="eps", clip=False)
    x_t = torch.randn(1, 3, 16, 16)
    assert torch.allclose(eps(x_t, 500), (x_t - float(base.sigma[500])) / float(base.a[500]))
