"""
The forward process of Scale Space Diffusion: resize operators, noise and level schedules, the closed-form
marginals q(x_t | x_0) and the exact posteriors q(x_{t-1} | x_t, x_0), resolution changes included.

Every operator here is separable: R x = A_h x A_w^T for each channel, with small dense per-axis matrices
(METHOD.md §1). That makes composition a product of two small matrices, the adjoint a transpose, and the
eigendecomposition of R^T R (needed for the exact posterior noise) two small symmetric eigenproblems.

Notation (METHOD.md): code steps t = 0..T-1, t = 0 the least noisy; s = t-1; a_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t). r(t) is the resolution of x_t.

    python degrade.py      # prints the ladders and level schedules of the paper's configurations
"""
import math

import torch

# -----------------------------------------------------------------------------
# Per-axis matrices. Each returns a float64 (n_out, n_in) matrix M, applied to a signal v as M @ v.


def resize_matrix(n_in, n_out):
    """Bilinear resize n_in -> n_out, exactly F.interpolate(mode="bilinear", antialias=True, align_corners=False).

    Output sample i sits at source coordinate (i + 0.5) * scale; its weights are a triangle (tent) filter over the
    source pixel centres j + 0.5. When downsampling, antialiasing stretches the tent by the scale factor, so 2x
    gives the taps [1/8, 3/8, 3/8, 1/8]; when upsampling it is plain linear interpolation. Taps that fall outside
    the image are dropped and the rest renormalised to sum to one, which is what PyTorch does at the border.
    """
    scale = n_in / n_out
    width = max(scale, 1.0)
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    sources = torch.arange(n_in, dtype=torch.float64) + 0.5
    taps = (1 - (sources[None, :] - centres[:, None]).abs() / width).clamp(min=0)
    return taps / taps.sum(dim=1, keepdim=True)


def box_matrix(n_in, factor=2):
    """Average pooling by an integer factor (F.avg_pool2d): each output is the mean of `factor` inputs."""
    if n_in % factor:
        raise ValueError(f"box downsampling by {factor} needs a size divisible by {factor}, got {n_in}")
    return torch.kron(torch.eye(n_in // factor, dtype=torch.float64),
                      torch.full((1, factor), 1 / factor, dtype=torch.float64))


# -----------------------------------------------------------------------------
# Separable operators on images


class Separable:
    """A linear operator on (..., H, W) images: R x = A_h x A_w^T, with A_h, A_w dense float64 matrices."""

    def __init__(self, h, w):
        self.h, self.w = h.to(torch.float64), w.to(torch.float64)
        self._cache = {}

    @classmethod
    def identity(cls, n):
        eye = torch.eye(n, dtype=torch.float64)
        return cls(eye, eye)

    @property
    def in_size(self):
        return self.h.shape[1]

    @property
    def out_size(self):
        return self.h.shape[0]

    def __matmul__(self, other):
        """Composition: (self @ other)(x) = self(other(x)), a product of per-axis matrices."""
        return Separable(self.h @ other.h, self.w @ other.w)

    @property
    def T(self):
        """The adjoint R^T: <R x, y> = <x, R^T y>."""
        return Separable(self.h.T, self.w.T)

    def _matrices(self, like):
        key = (like.device, like.dtype)
        if key not in self._cache:  # cast once per device and dtype, not at every call
            self._cache[key] = (self.h.to(like), self.w.T.contiguous().to(like))
        return self._cache[key]

    def __call__(self, x):
        h, w_t = self._matrices(x)
        return h @ x @ w_t

    def dense(self):
        """The full matrix on row-major flattened images: vec(A_h X A_w^T) = (A_h kron A_w) vec(X)."""
        return torch.kron(self.h, self.w)

    def gram_eig(self):
        """Eigendecomposition of R^T R = (A_h^T A_h) kron (A_w^T A_w), one small symmetric problem per axis."""
        if "eig" not in self._cache:
            lam_h, v_h = torch.linalg.eigh(self.h.T @ self.h)
            lam_w, v_w = torch.linalg.eigh(self.w.T @ self.w)
            self._cache["eig"] = (v_h, lam_h.clamp(min=0), v_w, lam_w.clamp(min=0))
        return self._cache["eig"]

    def largest_gram_eigenvalue(self):
        """lambda_max(R R^T) = lambda_max(A_h A_h^T) lambda_max(A_w A_w^T), the eigenvalues of a Kronecker product
        being the products of its factors'."""
        return float(torch.linalg.eigvalsh(self.h @ self.h.T)[-1] * torch.linalg.eigvalsh(self.w @ self.w.T)[-1])

    def row_space_isometry(self):
        """Q = R^T (R R^T)^{-1/2}: an isometry (Q^T Q = I) from the output space onto the row space of R.

        Per axis, with the thin SVD A = U S V^T, A^T (A A^T)^{-1/2} = V U^T. Used by the DDIM-style sampler.
        """
        if "iso" not in self._cache:
            u_h, _, vt_h = torch.linalg.svd(self.h, full_matrices=False)
            u_w, _, vt_w = torch.linalg.svd(self.w, full_matrices=False)
            self._cache["iso"] = Separable(vt_h.T @ u_h.T, vt_w.T @ u_w.T)
        return self._cache["iso"]


def downsample_operator(n_in, n_out, op="bilinear"):
    """The operator between two rungs of the ladder: antialiased bilinear (the paper's default) or box."""
    if op == "bilinear":
        m = resize_matrix(n_in, n_out)
    elif op == "box":
        if n_in % n_out:
            raise ValueError(f"box downsampling needs an integer factor, got {n_in} -> {n_out}")
        m = box_matrix(n_in, n_in // n_out)
    else:
        raise ValueError(f"unknown operator {op!r}: choose 'bilinear' or 'box'")
    return Separable(m, m)


# -----------------------------------------------------------------------------
# Noise schedule and the information proxy


def make_alphas_cumprod(T=1000, kind="linear"):
    """abar_t for t = 0..T-1 in float64. linear: betas linspace(1e-4, 0.02) (DDPM); cosine: Nichol & Dhariwal."""
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif kind == "cosine":
        f = lambda u: torch.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
        steps = torch.arange(T + 1, dtype=torch.float64)
        betas = (1 - f(steps[1:]) / f(steps[:-1])).clamp(max=0.999)
    else:
        raise ValueError(f"unknown noise schedule {kind!r}: choose 'linear' or 'cosine'")
    return torch.cumprod(1 - betas, dim=0)


def information_proxy(abar):
    """Paper Sec. 3.2, Fig. 2a (METHOD.md §6): Info(t) = P(|sigma_t eps| <= |a_t x_0|) with x_0 ~ U(-1, 1) per pixel.

    Info = 1 - 2 int_0^1 Phi(-s x) dx with s = a_t / sigma_t. Since d/du [u Phi(-u) - phi(u)] = Phi(-u),
    the integral is closed form: int_0^1 Phi(-s x) dx = Phi(-s) + (phi(0) - phi(s)) / s.
    """
    s = (abar / (1 - abar)).sqrt()
    normal = torch.distributions.Normal(torch.zeros((), dtype=s.dtype), torch.ones((), dtype=s.dtype))
    phi = lambda u: torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    return 1 - 2 * (normal.cdf(-s) + (phi(torch.zeros_like(s)) - phi(s)) / s)


# -----------------------------------------------------------------------------
# Level schedules: which rung of the ladder each step lives on (METHOD.md §1)

LEVEL_SHAPES = {
    "convex": lambda tau, gamma: 1 - (1 - tau) ** gamma,  # ConvexDecay(gamma), the paper's choice with gamma = 0.5
    "equal": lambda tau, gamma: tau,
    # The ablation's S-shapes from p(x) = -2x^3 + 3x^2 - 0.5 (project reading): SigmoidLike is p + 1/2 (slow at both
    # ends), TanhLike its mirror image across the diagonal, 2 tau - (p + 1/2) (fast at both ends).
    "sigmoid": lambda tau, gamma: 3 * tau ** 2 - 2 * tau ** 3,
    "tanh": lambda tau, gamma: 2 * tau - (3 * tau ** 2 - 2 * tau ** 3),
}
SCHEDULES = tuple(LEVEL_SHAPES) + ("info",)


def level_transitions(levels, T=1000, schedule="convex", gamma=0.5, noise="linear"):
    """The L-1 steps t with r(t) != r(t-1), in increasing order.

    Shape schedules: level(t) = min(floor(L f(tau)), L-1), tau = t/(T-1). "info" (project choice): move to level k
    at the first step where the information proxy of x_t drops to that of the image at 1/2^k resolution, 4^-k.
    """
    if levels == 1:
        return []
    if schedule == "info":
        info = information_proxy(make_alphas_cumprod(T, noise))
        if info[-1] > 4.0 ** -(levels - 1):
            reachable = 1 + int(math.log(1 / float(info[-1]), 4))
            raise ValueError(f"the information proxy never drops to 4^-{levels - 1} with the {noise} noise schedule and "
                             f"T = {T}: schedule 'info' reaches at most {reachable} levels; use fewer or another schedule")
        return [int(torch.nonzero(info <= 4.0 ** -k)[0]) for k in range(1, levels)]
    if schedule not in LEVEL_SHAPES:
        raise ValueError(f"unknown level schedule {schedule!r}: choose one of {SCHEDULES}")
    tau = torch.arange(T, dtype=torch.float64) / (T - 1)
    # Plain float64, as in the paper's code: t = 888 lies exactly on f = 2/3 and rounds just below it, which is why
    # the paper's transitions (METHOD.md §1) read 889 there.
    level = torch.floor(levels * LEVEL_SHAPES[schedule](tau, gamma)).clamp(max=levels - 1).long()
    return [int(t) for t in torch.nonzero(level[1:] != level[:-1]).flatten() + 1]


# -----------------------------------------------------------------------------
# The scale space: marginals, targets and posteriors


class ScaleSpace:
    """The forward process x_t = a_t R_{1:t} x_0 + sigma_t eps at resolution r(t) (paper Thm 1, METHOD.md §1), and its posterior.

    res: full resolution; levels: rungs of the ladder res, res/2, ..., res/2^(L-1) (levels = 1 is plain DDPM with
    x0-prediction, through the same code). `sizes` replaces the halving ladder by any decreasing list of sizes
    (e.g. the supplement's 1-pixel "gradual downsizing" 32, 31, 30, ...) with bilinear resizes between them.
    `transitions` replaces the level schedule by explicit steps (L-1 increasing steps in 1..T-1).
    preserve_snr (project option, off in the paper): at each resolution change the signal is scaled by
    g = 1/sqrt(lambda_max(R R^T)) (about 2 for a halving), so that the lowest frequencies keep their signal-to-noise
    ratio across the change instead of losing a factor of about 4 (METHOD.md §1). Then a_t = g_{k(t)} sqrt(abar_t).
    """

    def __init__(self, res, levels, T=1000, schedule="convex", gamma=0.5, op="bilinear", noise="linear",
                 sizes=None, transitions=None, preserve_snr=False):
        self.T, self.levels, self.op = T, levels, op
        self.sizes = list(sizes) if sizes is not None else self._halving_ladder(res, levels)
        if len(self.sizes) != levels or any(a <= b for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError(f"sizes must be {levels} strictly decreasing resolutions, got {self.sizes}")
        self.transitions = list(transitions) if transitions is not None else \
            level_transitions(levels, T, schedule, gamma, noise)
        if len(self.transitions) != levels - 1 or any(not 0 < t < T for t in self.transitions) \
                or sorted(set(self.transitions)) != self.transitions:
            raise ValueError(f"need {levels - 1} increasing transition steps in 1..{T - 1}, got {self.transitions}")

        self.level = torch.zeros(T, dtype=torch.long)
        for t in self.transitions:
            self.level[t:] += 1
        self._level = self.level.tolist()  # python ints: looking a level up must never touch a GPU
        # One operator per rung (from the rung above), composed once into R_{1:t} per level (never a loop over t).
        self.steps_down = [Separable.identity(self.sizes[0])] + [
            downsample_operator(n_in, n_out, op) for n_in, n_out in zip(self.sizes, self.sizes[1:])]
        self._between = {}
        self.cumulative = [self.steps_down[0]]
        for step in self.steps_down[1:]:
            self.cumulative.append(step @ self.cumulative[-1])

        abar = make_alphas_cumprod(T, noise)
        self.abar, self.preserve_snr = abar, preserve_snr
        # The signal coefficient of x_t: a_t = sqrt(abar_t), times the gain of its level.
        self.gain = torch.ones(levels, dtype=torch.float64)
        if preserve_snr:
            self.gain = torch.cumprod(torch.tensor([1.0] + [step.largest_gram_eigenvalue() ** -0.5
                                                            for step in self.steps_down[1:]], dtype=torch.float64), 0)
        gain = self.gain[self.level]
        self.a, self.sigma = abar.sqrt() * gain, (1 - abar).sqrt()
        self.snr = abar * gain ** 2 / (1 - abar)
        self._abar, self._gain = abar.tolist(), gain.tolist()  # python floats for the sampler's scalar algebra

    @staticmethod
    def _halving_ladder(res, levels):
        if levels < 1 or res % 2 ** (levels - 1):
            raise ValueError(f"{levels} levels halve {res} px {levels - 1} times, which needs a resolution divisible "
                             f"by {2 ** (levels - 1)}; pick fewer levels or a resolution such as 32, 64, 128 or 256")
        return [res >> k for k in range(levels)]

    # --- lookups -------------------------------------------------------------

    def level_of(self, t):
        """Level of step t: a python int, or a tensor of steps that must all share one level (kept on the CPU)."""
        if isinstance(t, int):
            return self._level[t]
        levels = self.level[t.cpu()]
        if (levels != levels.flatten()[0]).any():
            raise ValueError("all steps of a batch must share one level (one input resolution per forward pass)")
        return int(levels.flatten()[0])

    def res(self, t):
        """Resolution of x_t."""
        return self.sizes[self.level_of(t)]

    def target_level(self, t):
        """Level of the network's output at step t: that of x_{t-1}, and full resolution at t = 0."""
        if isinstance(t, int):
            return self._level[max(t - 1, 0)]
        return self.level_of((t - 1).clamp(min=0))

    def operator_between(self, level_from, level_to):
        """R from the resolution of one level to a lower one: the composition of the rungs in between.

        Built once per pair of levels, so its device copies and eigendecomposition are cached with it.
        """
        key = (level_from, level_to)
        if key not in self._between:
            op = Separable.identity(self.sizes[level_from])
            for step in self.steps_down[level_from + 1:level_to + 1]:
                op = step @ op
            self._between[key] = op
        return self._between[key]

    def _per_image(self, values, t, like):
        """Gather a schedule value at t (int or CPU tensor of steps) as a scalar or a (B,1,1,1) tensor."""
        if isinstance(t, int):
            return float(values[t])
        return values[t.cpu()].to(like.device, like.dtype, non_blocking=True).view(-1, 1, 1, 1)

    # --- forward process ----------------------------------------------------

    def degrade(self, x0, level):
        """R_{1:t} x0 for a step t on `level` (x0 at full resolution, NCHW)."""
        return self.cumulative[level](x0) if level else x0

    def q_sample(self, x0, t, noise=None):
        """x_t = a_t R_{1:t} x_0 + sigma_t eps, eps ~ N(0, I) at r(t) (METHOD.md §1; no noise rescaling at a resize)."""
        mean = self.degrade(x0, self.level_of(t))
        if noise is None:
            noise = torch.randn_like(mean)
        return self._per_image(self.a, t, mean) * mean + self._per_image(self.sigma, t, mean) * noise

    def target(self, x0, t):
        """The network's regression target R_{1:t-1} x_0 at r(t-1); x_0 itself at t = 0 (METHOD.md §3)."""
        return self.degrade(x0, self.target_level(t))

    # --- reverse process ----------------------------------------------------

    def pair(self, t, s):
        """(c, rho, R) for the step t -> s: c = a_t / a_s (sqrt(abar_t / abar_s) inside a level, and without
        preserve_snr), rho = sigma_s^2 / sigma_t^2 (METHOD.md §2). Python floats: a sampling step does no tensor
        arithmetic on scalars."""
        abar, gain = self._abar, self._gain
        c = math.sqrt(abar[t] / abar[s]) * (gain[t] / gain[s])
        rho = (1 - abar[s]) / (1 - abar[t])
        return c, rho, self.operator_between(self._level[s], self._level[t])

    def posterior_mean(self, x_t, x0_hat, t, s=None):
        """mean = mu_s + rho c R^T (x_t - c R mu_s), mu_s = a_s x_hat (paper Thm 2-3, Woodbury form).

        x0_hat is the prediction of R_{1:s} x_0 at r(s). Inside a level R = I and this is DDPM's posterior mean.
        """
        s = t - 1 if s is None else s
        c, rho, R = self.pair(t, s)
        mu_s = float(self.a[s]) * x0_hat
        if R.in_size == R.out_size:  # same level: R = I
            return (1 - rho * c * c) * mu_s + rho * c * x_t
        return mu_s + rho * c * R.T(x_t - c * R(mu_s))

    def posterior_noise(self, xi, t, s=None):
        """Noise with covariance sigma_s^2 (I - rho c^2 R^T R), drawn exactly from unit noise xi at r(s).

        With R^T R = V diag(lam) V^T per axis, the covariance square root is
        sigma_s V_h [ (V_h^T xi V_w) * sqrt(1 - rho c^2 lam_h lam_w^T) ] V_w^T: full variance in the null space of R
        (detail the coarser state cannot know), reduced variance along the low frequencies it does know.
        """
        s = t - 1 if s is None else s
        c, rho, R = self.pair(t, s)
        sigma_s = float(self.sigma[s])
        if R.in_size == R.out_size:  # R = I: isotropic, DDPM's fixed-small variance beta~_t
            return sigma_s * math.sqrt(max(1 - rho * c * c, 0.0)) * xi
        v_h, lam_h, v_w, lam_w = (m.to(xi) for m in R.gram_eig())
        scale = (1 - rho * c * c * lam_h[:, None] * lam_w[None, :]).clamp(min=0).sqrt()
        return sigma_s * (v_h @ ((v_h.T @ xi @ v_w) * scale) @ v_w.T)

    def p_step(self, x_t, x0_hat, t, s=None, generator=None, xi=None):
        """One ancestral step x_t -> x_s (s = t-1 unless a respaced sampler gives the next kept step).

        x0_hat is the model's clean prediction at r(s); xi optional unit noise at r(s) (else drawn from generator).
        At t = 0 it returns the clean prediction (METHOD.md §4, project choice).
        """
        if t == 0:
            return x0_hat
        if xi is None:
            xi = torch.randn(x0_hat.shape, generator=generator, device=x0_hat.device, dtype=x0_hat.dtype)
        return self.posterior_mean(x_t, x0_hat, t, s) + self.posterior_noise(xi, t, s)

    def describe(self):
        """Per level: resolution, step range, share of steps and share of pixels processed."""
        bounds = [0] + self.transitions + [self.T]
        pixels = [(b - a) * self.sizes[k] ** 2 for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        return [dict(level=k, res=self.sizes[k], steps=(a, b - 1), step_share=(b - a) / self.T,
                     pixel_share=pixels[k] / (self.T * self.sizes[0] ** 2))
                for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


PAPER_CONFIGS = [(64, 1), (64, 2), (64, 3), (64, 4), (128, 3), (128, 5), (256, 3), (256, 4), (256, 5), (256, 6)]

if __name__ == "__main__":
    for res, levels in PAPER_CONFIGS:
        ss = ScaleSpace(res, levels)
        print(f"\n{res} px, {levels} level(s), ConvexDecay 0.5: transitions at t = {ss.transitions}")
        print(f"  {'level':>5} {'res':>5} {'steps':>11} {'steps %':>8} {'pixels %':>9}")
        for row in ss.describe():
            a, b = row["steps"]
            print(f"  {row['level']:>5} {row['res']:>5} {f'{a}-{b}':>11} {100 * row['step_share']:>7.1f}% "
                  f"{100 * row['pixel_share']:>8.1f}%")
        print(f"  pixels processed vs full-resolution diffusion: {sum(r['pixel_share'] for r in ss.describe()):.3f}")
