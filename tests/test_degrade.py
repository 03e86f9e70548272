"""The forward process and the posterior of degrade.py, checked against PyTorch ops, dense matrices and Monte Carlo."""
import math

import pytest
import torch
import torch.nn.functional as F

from degrade import (ScaleSpace, Separable, box_matrix, downsample_operator, information_proxy,
                     level_transitions, make_alphas_cumprod, resize_matrix)
from ssd import sampling_steps

torch.manual_seed(0)


def rand_images(n, size, c=3):
    return torch.randn(n, c, size, size, dtype=torch.float64)


# --- operators ---------------------------------------------------------------

@pytest.mark.parametrize("n_in,n_out", [(8, 4), (64, 32), (32, 16), (32, 31), (31, 30), (7, 3), (4, 8), (5, 9), (6, 6)])
def test_resize_matches_interpolate(n_in, n_out):
    x = rand_images(2, n_in)
    ref = F.interpolate(x, size=(n_out, n_out), mode="bilinear", antialias=True, align_corners=False)
    m = resize_matrix(n_in, n_out)
    assert torch.allclose(Separable(m, m)(x), ref, atol=1e-12)


def test_bilinear_2x_taps():
    m = resize_matrix(16, 8)
    assert torch.allclose(m[3, 4:10], torch.tensor([0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0], dtype=torch.float64))
    # METHOD.md §1: lambda_max(R R^T) of the 2-D operator is about 0.25, so the transition covariance stays PSD.
    lam = torch.linalg.eigvalsh(m @ m.T).max() ** 2
    assert 0.2 < lam <= 0.3


def test_rectangular_operator_and_box():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    op = Separable(resize_matrix(8, 4), resize_matrix(12, 6))
    ref = F.interpolate(x, size=(4, 6), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(op(x), ref, atol=1e-12)
    box = Separable(box_matrix(8), box_matrix(12))
    assert torch.allclose(box(x), F.avg_pool2d(x, 2), atol=1e-12)
    box4 = downsample_operator(16, 4, "box")
    y = rand_images(2, 16)
    assert torch.allclose(box4(y), F.avg_pool2d(y, 4), atol=1e-12)
    # METHOD.md §1: for box, R R^T = I/4 exactly.
    d = downsample_operator(8, 4, "box").dense()
    assert torch.allclose(d @ d.T, torch.eye(16, dtype=torch.float64) / 4)


def test_identity_adjoint_composition_dense():
    a = Separable(resize_matrix(12, 6), resize_matrix(12, 5))
    b = Separable(resize_matrix(6, 3), resize_matrix(5, 4))
    x, y = rand_images(1, 12, 1)[:, :, :, :12], torch.randn(1, 1, 6, 5, dtype=torch.float64)
    assert torch.allclose((a(x) * y).sum(), (x * a.T(y)).sum())  # <Rx, y> = <x, R^T y>
    assert torch.allclose((b @ a)(x), b(a(x)))
    assert torch.allclose(a.dense() @ x.flatten(), a(x).flatten())
    assert torch.equal(Separable.identity(12)(x), x)


def test_row_space_isometry():
    R = downsample_operator(8, 4)
    Q = R.row_space_isometry().dense()
    assert torch.allclose(Q.T @ Q, torch.eye(16, dtype=torch.float64), atol=1e-12)
    P = Q @ Q.T  # projector onto the row space of R: R P = R
    assert torch.allclose(R.dense() @ P, R.dense(), atol=1e-12)


# --- schedules ---------------------------------------------------------------

PAPER_TRANSITIONS = {2: [750], 3: [555, 889], 4: [438, 750, 937], 5: [360, 640, 840, 960],
                    6: [306, 555, 750, 889, 972]}


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 6])
def test_convex_transitions_equal_spec_table(levels):
    assert level_transitions(levels) == PAPER_TRANSITIONS[levels]


def test_other_schedules():
    assert level_transitions(4, schedule="equal") == [250, 500, 750]
    assert level_transitions(4, schedule="info") == [344, 606, 800]  # paper Sec. 3.2: crossings of 1/4, 1/16, 1/64
    for name in ("sigmoid", "tanh"):
        steps = level_transitions(4, schedule=name)
        assert len(steps) == 3 and steps == sorted(steps)
    # SigmoidLike is slow at the ends: its middle level is the longest; TanhLike the opposite.
    sig, tanh = level_transitions(3, schedule="sigmoid"), level_transitions(3, schedule="tanh")
    assert sig[1] - sig[0] < tanh[1] - tanh[0]


def test_noise_schedules():
    abar = make_alphas_cumprod(1000)
    assert abar[0] == pytest.approx(1 - 1e-4) and abar[-1] == pytest.approx(4.04e-5, rel=0.01)
    cos = make_alphas_cumprod(1000, "cosine")
    assert (cos[1:] < cos[:-1]).all() and cos[-1] < 1e-4
    assert information_proxy(abar)[0] == pytest.approx(0.992, abs=5e-4)


def test_bad_configurations_say_what_to_do():
    with pytest.raises(ValueError, match="divisible by 8"):
        ScaleSpace(20, 4)
    with pytest.raises(ValueError, match="unknown level schedule"):
        ScaleSpace(64, 4, schedule="cubic")
    with pytest.raises(ValueError, match="unknown operator"):
        ScaleSpace(64, 4, op="lanczos")
    with pytest.raises(ValueError, match="increasing transition steps"):
        ScaleSpace(64, 3, transitions=[600, 500])


def test_ladder_and_lookups():
    ss = ScaleSpace(64, 4)
    assert [ss.res(t) for t in (0, 437, 438, 749, 750, 936, 937, 999)] == [64, 64, 32, 32, 16, 16, 8, 8]
    assert ss.target_level(438) == 0 and ss.target_level(439) == 1 and ss.target_level(0) == 0
    assert ss.res(torch.tensor([500, 600])) == 32
    with pytest.raises(ValueError, match="share one level"):
        ss.res(torch.tensor([100, 600]))
    assert sum(row["step_share"] for row in ss.describe()) == pytest.approx(1)
    gradual = ScaleSpace(8, 3, sizes=[8, 7, 6])
    assert gradual.cumulative[2].out_size == 6


# --- marginals and posteriors --------------------------------------------------

def test_marginal_moments_monte_carlo():
    """q(x_t | x_0) = N(a_t R_{1:t} x_0, sigma_t^2 I) at r(t): the two ways to call q_sample, checked by sampling."""
    ss = ScaleSpace(8, 3)
    x0 = rand_images(1, 8, 1).clamp(-1, 1)
    t, n = 600, 40000
    xt = ss.q_sample(x0.expand(n, -1, -1, -1), torch.full((n,), t))
    assert xt.shape == (n, 1, 4, 4)
    mean = float(ss.a[t]) * ss.cumulative[1](x0)[0]
    var = float(ss.sigma[t]) ** 2
    z = (xt.mean(0) - mean) / math.sqrt(var / n)
    assert z.abs().max() < 4.5
    cov = torch.cov(xt.flatten(1).T) / var
    assert (cov - torch.eye(16, dtype=torch.float64)).abs().max() < 0.05
    # The int-step path gives the same law (same noise, same result).
    noise = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(ss.q_sample(x0, t, noise), ss.q_sample(x0, torch.tensor([t]), noise))


def dense_posterior(ss, x0, xt, t, s):
    """Bayes' rule with dense matrices: prior q(x_s | x_0), likelihood q(x_t | x_s) = N(c R x_s, Sigma_{t|s})."""
    c, _, R = ss.pair(t, s)
    Rd = R.dense()
    eye_t, eye_s = torch.eye(Rd.shape[0], dtype=torch.float64), torch.eye(Rd.shape[1], dtype=torch.float64)
    prior_mean = float(ss.a[s]) * ss.cumulative[ss.level_of(s)].dense() @ x0.flatten()
    prior_var = float(ss.sigma[s]) ** 2
    lik_cov = float(ss.sigma[t]) ** 2 * eye_t - prior_var * c * c * Rd @ Rd.T  # METHOD.md §1 transition covariance
    precision = eye_s / prior_var + c * c * Rd.T @ torch.linalg.solve(lik_cov, Rd)
    cov = torch.linalg.inv(precision)
    mean = cov @ (prior_mean / prior_var + c * Rd.T @ torch.linalg.solve(lik_cov, xt.flatten()))
    return mean, cov


def noise_covariance(ss, t, s, size):
    """The covariance of posterior_noise, exactly: the map xi -> z is linear, so probe it with a basis."""
    basis = torch.eye(size * size, dtype=torch.float64).view(-1, 1, size, size)
    L = ss.posterior_noise(basis, t, s).flatten(1).T
    return L @ L.T


def assert_posterior_matches_dense_bayes(ss, t, s):
    """The posterior of 8x8 images from t to s: its mean and its noise's covariance against dense_posterior."""
    x0 = rand_images(1, 8, 1)
    xt = rand_images(1, ss.res(t), 1)
    x_hat = ss.degrade(x0, ss.level_of(s))
    mean, cov = dense_posterior(ss, x0, xt, t, s)
    assert torch.allclose(ss.posterior_mean(xt, x_hat, t, s).flatten(), mean, atol=1e-9)
    assert torch.allclose(noise_covariance(ss, t, s, ss.res(s)), cov, atol=1e-9)


@pytest.mark.parametrize("op", ["bilinear", "box"])
@pytest.mark.parametrize("t,s", [(400, 399), (438, 437), (438, 420), (760, 700), (937, 600)])
@pytest.mark.parametrize("preserve_snr", [False, True])
def test_posterior_matches_dense_bayes(op, t, s, preserve_snr):
    """8x8 -> 4x4 (and deeper): mean through R^T and the non-isotropic covariance equal Bayes' rule, for the
    paper's process and with the gains of preserve_snr."""
    ss = ScaleSpace(8, 4, op=op, preserve_snr=preserve_snr)
    assert_posterior_matches_dense_bayes(ss, t, s)


@pytest.mark.parametrize("t,s", [(555, 554), (555, 500), (760, 700)])
@pytest.mark.parametrize("preserve_snr", [False, True])
def test_posterior_matches_dense_bayes_with_transitions_set(t, s, preserve_snr):
    """As above with --transitions 555,750,937: where the resolution changes is a setting; the maths is the same."""
    ss = ScaleSpace(8, 4, preserve_snr=preserve_snr, transitions=[555, 750, 937])
    assert ss.level_of(s) < ss.level_of(t)  # each pair crosses a resolution change
    assert_posterior_matches_dense_bayes(ss, t, s)


def test_box_posterior_noise_closed_form():
    """METHOD.md §2: for box the covariance square root is (I - P) + sqrt(1 - rho c^2 / 4) P, P the block-mean projector."""
    ss = ScaleSpace(8, 2, op="box")
    t = ss.transitions[0]
    c, rho, R = ss.pair(t, t - 1)
    P = 4 * R.T.dense() @ R.dense()
    root = (torch.eye(64, dtype=torch.float64) - P) + math.sqrt(1 - rho * c * c / 4) * P
    expected = float(ss.sigma[t - 1]) ** 2 * root @ root.T
    assert torch.allclose(noise_covariance(ss, t, t - 1, 8), expected, atol=1e-12)


def test_identity_step_is_ddpm():
    """With R = I the posterior is DDPM's: mean coefficients and fixed-small variance beta~_t."""
    ss = ScaleSpace(8, 1)
    t = 300
    abar_t, abar_s = float(ss.abar[t]), float(ss.abar[t - 1])
    beta = 1 - abar_t / abar_s
    x_hat, xt = rand_images(2, 8), rand_images(2, 8)
    ddpm_mean = (math.sqrt(abar_s) * beta * x_hat + math.sqrt(1 - beta) * (1 - abar_s) * xt) / (1 - abar_t)
    assert torch.allclose(ss.posterior_mean(xt, x_hat, t), ddpm_mean, atol=1e-12)
    beta_tilde = beta * (1 - abar_s) / (1 - abar_t)
    xi = rand_images(2, 8)
    assert torch.allclose(ss.posterior_noise(xi, t), math.sqrt(beta_tilde) * xi, atol=1e-12)
    assert torch.equal(ss.p_step(xt, x_hat, 0), x_hat)


def isotropic_noise(ss, xi, t, s):
    """The shortcut the paper warns against (supplement Fig. 10): isotropic noise of the in-level variance."""
    c, rho, _ = ss.pair(t, s)
    return float(ss.sigma[s]) * math.sqrt(1 - rho * c * c) * xi


@pytest.mark.parametrize("t", [438, 300, 750])
def test_posterior_step_keeps_the_marginal(t):
    """x_t ~ q(x_t|x_0), then a posterior step with the exact x_hat = R_{1:s} x_0 gives x_s ~ q(x_s|x_0) (METHOD.md §2)."""
    ss = ScaleSpace(8, 4)
    s, n = t - 1, 50000
    gen = torch.Generator().manual_seed(t)
    x0 = torch.rand(1, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    xt = ss.q_sample(x0.expand(n, -1, -1, -1), t,
                     torch.randn(n, 1, ss.res(t), ss.res(t), generator=gen, dtype=torch.float64))
    x_hat = ss.degrade(x0, ss.level_of(s)).expand(n, -1, -1, -1)
    xi = torch.randn(n, 1, ss.res(s), ss.res(s), generator=gen, dtype=torch.float64)
    xs = ss.p_step(xt, x_hat, t, xi=xi)
    d = ss.res(s) ** 2
    var = float(ss.sigma[s]) ** 2
    z = (xs.mean(0) - float(ss.a[s]) * x_hat[0]) / math.sqrt(var / n)
    cov_err = (torch.cov(xs.flatten(1).T) / var - torch.eye(d, dtype=torch.float64)).abs().max()
    assert z.abs().max() < 5 and cov_err < 0.05
    if t in ss.transitions:  # the test can fail: isotropic noise at a resolution change misses the detail variance
        wrong = ss.posterior_mean(xt, x_hat, t) + isotropic_noise(ss, xi, t, s)
        wrong_err = (torch.cov(wrong.flatten(1).T) / var - torch.eye(d, dtype=torch.float64)).abs().max()
        assert wrong_err > 0.5


# -----------------------------------------------------------------------------
# preserve_snr: the signal scaled at each resolution change (METHOD.md §1)


def gains_from_dense(ss):
    """The level gains computed here from dense matrices: the product of 1 / sqrt(lambda_max(R_j R_j^T))."""
    gains = [1.0]
    for step in ss.steps_down[1:]:
        R = step.dense()
        gains.append(gains[-1] / math.sqrt(float(torch.linalg.eigvalsh(R @ R.T)[-1])))
    return gains


@pytest.mark.parametrize("op", ["bilinear", "box"])
def test_preserve_snr_gains_are_about_two_per_halving(op):
    ss = ScaleSpace(16, 4, op=op, preserve_snr=True)
    gains = gains_from_dense(ss)
    assert torch.allclose(ss.gain, torch.tensor(gains, dtype=torch.float64), atol=1e-12)
    ratios = [b / a for a, b in zip(gains, gains[1:])]
    assert all(1.95 < r <= 2.0 + 1e-12 for r in ratios)  # exactly 2 for box, a little less for bilinear's borders
    for t in range(ss.T):
        assert float(ss.a[t]) == pytest.approx(gains[ss.level_of(t)] * math.sqrt(float(ss.abar[t])), rel=1e-12)
    assert torch.equal(ScaleSpace(16, 4, op=op).gain, torch.ones(4, dtype=torch.float64))  # off: the paper's


@pytest.mark.parametrize("op, transitions", [("bilinear", None), ("box", None), ("bilinear", [555, 750, 937])])
def test_preserve_snr_transition_covariances_stay_psd_and_the_lowest_frequency_keeps_its_snr(op, transitions):
    """The chain behind the marginals exists: sigma_t^2 I - c^2 sigma_s^2 R R^T is PSD for every pair a sampler
    visits (consecutive and respaced), and at a resolution change the top singular direction of R loses SNR at the
    rate of an in-level step, not 4x faster; with the paper's transitions and with --transitions set."""
    ss = ScaleSpace(16, 4, op=op, preserve_snr=True, transitions=transitions)
    gains = gains_from_dense(ss)
    pairs = {(t, t - 1) for t in range(1, ss.T)}
    for steps in (250, 50, 12):
        kept = sampling_steps(ss, steps)
        pairs |= set(zip(kept, kept[1:]))
    for t, s in sorted(pairs):
        c, _, R = ss.pair(t, s)
        signal_t = gains[ss.level_of(t)] * math.sqrt(float(ss.abar[t]))
        signal_s = gains[ss.level_of(s)] * math.sqrt(float(ss.abar[s]))
        assert c == pytest.approx(signal_t / signal_s, rel=1e-12)  # the mean of x_t given x_s is c R x_s
        Rd = R.dense()
        cov = float(ss.sigma[t]) ** 2 * torch.eye(Rd.shape[0], dtype=torch.float64) - \
            c * c * float(ss.sigma[s]) ** 2 * Rd @ Rd.T
        assert float(torch.linalg.eigvalsh(cov)[0]) > -1e-12, (t, s)
    for t in ss.transitions:
        c, _, R = ss.pair(t, t - 1)
        top = float(torch.linalg.eigvalsh(R.dense() @ R.dense().T)[-1])
        assert c * c * top == pytest.approx(float(ss.abar[t] / ss.abar[t - 1]), rel=1e-10)


@pytest.mark.parametrize("t, transitions", [(438, None), (750, None), (300, None), (555, [555, 750, 937])])
def test_preserve_snr_posterior_step_keeps_the_marginal(t, transitions):
    """Monte Carlo, as for the paper's process: x_t ~ q(x_t|x_0), one step with the exact x_hat, x_s ~ q(x_s|x_0),
    whose mean is g_s a_s R_{1:s} x_0 with the gains computed here."""
    ss = ScaleSpace(8, 4, preserve_snr=True, transitions=transitions)
    gains = gains_from_dense(ss)
    s, n = t - 1, 50000
    gen = torch.Generator().manual_seed(t)
    x0 = torch.rand(1, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    xt = ss.q_sample(x0.expand(n, -1, -1, -1), t,
                     torch.randn(n, 1, ss.res(t), ss.res(t), generator=gen, dtype=torch.float64))
    expected_t = gains[ss.level_of(t)] * math.sqrt(float(ss.abar[t])) * ss.degrade(x0, ss.level_of(t))[0]
    assert ((xt.mean(0) - expected_t) / (float(ss.sigma[t]) / math.sqrt(n))).abs().max() < 5
    x_hat = ss.degrade(x0, ss.level_of(s)).expand(n, -1, -1, -1)
    xs = ss.p_step(xt, x_hat, t, xi=torch.randn(n, 1, ss.res(s), ss.res(s), generator=gen, dtype=torch.float64))
    var = float(ss.sigma[s]) ** 2
    expected_s = gains[ss.level_of(s)] * math.sqrt(float(ss.abar[s])) * x_hat[0]
    z = (xs.mean(0) - expected_s) / math.sqrt(var / n)
    cov_err = (torch.cov(xs.flatten(1).T) / var - torch.eye(ss.res(s) ** 2, dtype=torch.float64)).abs().max()
    assert z.abs().max() < 5 and cov_err < 0.05


def test_preserve_snr_raises_the_loss_weight_of_the_small_levels():
    paper, shifted = ScaleSpace(64, 4), ScaleSpace(64, 4, preserve_snr=True)
    for t in (100, 500, 800, 990):
        assert float(shifted.snr[t]) == pytest.approx(float(paper.snr[t]) * float(shifted.gain[paper.level_of(t)]) ** 2)


def test_preserve_snr_makes_a_transition_lean_on_the_prediction_no_more_than_an_in_level_step():
    """How much of the lowest frequency (the mean colour) of x_s the posterior mean takes from the prediction x_hat
    rather than from x_t. Inside a level the answer is a few thousandths at these steps; at a resolution change of
    the paper's process x_t holds that frequency at a quarter of the SNR, so the step takes up to 0.28 of it from
    x_hat (t = 438): the errors of an untrained transition path pass into the image. With the gains it is back
    to an in-level step's share."""
    def weight_on_prediction(ss, t):
        x_t = torch.zeros(1, 1, ss.res(t), ss.res(t), dtype=torch.float64)
        x_hat = torch.ones(1, 1, ss.res(t - 1), ss.res(t - 1), dtype=torch.float64)
        return float(ss.posterior_mean(x_t, x_hat, t).mean())

    for levels in (3, 4):
        paper, shifted = ScaleSpace(64, levels), ScaleSpace(64, levels, preserve_snr=True)
        for t in paper.transitions:
            inside = weight_on_prediction(paper, t - 1)  # the next sampling step, inside the finer level
            assert weight_on_prediction(shifted, t) < 1.5 * inside + 1e-3
            if t < 600:  # where the signal is not yet drowned: 0.28 at t = 438 (4 levels), 0.16 at t = 555 (3)
                assert weight_on_prediction(paper, t) > 30 * inside
