"""
Scale Space Diffusion: the training loss and the samplers, for any denoiser.

A denoiser here is a function denoise(x_t, t) -> x_hat that takes x_t at r(t) and a python int step t, and returns
the clean prediction at the *next* resolution r(t-1) (full resolution at t = 0): x_hat ~ R_{1:t-1} x_0 (METHOD.md §3).
`network_denoiser` turns a Flexi-UNet into one; the tests drive the samplers with the ideal denoiser of Gaussian data.
"""
import functools
import math

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Training


def batch_steps(ss, batch_size, shared_gen, local_gen, transition_share=None, level_shares=None):
    """The steps of one batch (METHOD.md §3): every forward pass has one (input, output) resolution pair.

    A resolution-changing step takes the whole batch; otherwise the batch draws its steps uniformly among the
    non-changing steps of one level. The paper draws one t uniformly over all T steps to decide, so each of the
    L-1 changing steps gets 1/T of the batches and each level a share in proportion to its steps;
    `transition_share` and `level_shares` (project options: relative shares per level, finest first) set those
    shares instead. The coin and the level come from `shared_gen`, which every DDP rank seeds alike, so all ranks
    run the same resolution pair at each step; the per-image steps come from `local_gen`. Returns a CPU int64
    tensor.
    """
    share = (ss.levels - 1) / ss.T if transition_share is None else transition_share
    if ss.transitions and torch.rand((), generator=shared_gen, dtype=torch.float64) < share:
        t = ss.transitions[int(torch.randint(len(ss.transitions), (), generator=shared_gen))]
        return torch.full((batch_size,), t, dtype=torch.long)
    inner = inner_steps(ss)
    if level_shares is not None:
        level = int(torch.multinomial(torch.tensor(level_shares, dtype=torch.float64), 1, generator=shared_gen))
        return inner[level][torch.randint(len(inner[level]), (batch_size,), generator=local_gen)]
    pick = int(torch.randint(sum(len(s) for s in inner), (), generator=shared_gen))
    for steps in inner:  # the level whose non-changing steps contain the pick, uniformly over all such steps
        if pick < len(steps):
            return steps[torch.randint(len(steps), (batch_size,), generator=local_gen)]
        pick -= len(steps)


def inner_steps(ss):
    """Per level, the steps that keep the resolution (every step but the level's first, except on level 0)."""
    bounds = [0] + ss.transitions + [ss.T]
    return [torch.arange(a + (k > 0), b) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def training_example(ss, x0, t, parameterisation="x0", min_snr=5.0, noise=None):
    """Network input, regression target and Min-SNR loss weight for clean images x0 at steps t (CPU tensor).

    x0-prediction: target R_{1:t-1} x0 at r(t-1), weight min(SNR_t, gamma) (METHOD.md §3).
    eps-prediction (the DDPM-eps baseline, one level only): target eps, weight min(SNR_t, gamma) / SNR_t, the same
    loss expressed in eps (Hang et al., Min-SNR). Computed in float32 outside autocast: the forward process is exact.
    """
    if noise is None:
        noise = torch.randn(x0.shape[0], x0.shape[1], ss.res(t), ss.res(t), device=x0.device, dtype=x0.dtype)
    x_t = ss.q_sample(x0, t, noise)
    snr = ss.snr[t]
    if parameterisation == "x0":
        target, weight = ss.target(x0, t), snr.clamp(max=min_snr)
    elif parameterisation == "eps":
        if ss.levels != 1:
            raise ValueError("eps-prediction is the one-level DDPM baseline; use x0-prediction with several levels")
        target, weight = noise, snr.clamp(max=min_snr) / snr
    else:
        raise ValueError(f"unknown parameterisation {parameterisation!r}: choose 'x0' or 'eps'")
    return x_t, target, weight.to(x0.device, torch.float32, non_blocking=True)


def weighted_mse(pred, target, weight):
    """Per-image weighted mean squared error over pixels, (B,); the training loss is its mean."""
    return weight * F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)


# -----------------------------------------------------------------------------
# Noise for sampling: per-sample seeds


def _mul32(x, c):
    """(x * c) mod 2^32 for x < 2^32 in int64 tensors, split in 16-bit halves so nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x):
    """An integer hash with good avalanche (the "lowbias32" xorshift-multiply construction) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_noise(seeds, fused=False):
    """A noise source where image k's noise is a function of (seeds[k], key, pixel) alone.

    Image k is then the same whatever the batch it is drawn in or the GPU it runs on, and the noise for a whole
    batch is made by a few vectorised integer ops (no generator per image, no Python loop over the batch).
    noise(key, shape) returns N(0, I) of `shape` (B first) by Box-Muller from two hashed 32-bit counters.
    fused: on CUDA, make it with one kernel (fused_box_muller; bench.py --fused_noise True times both).
    """
    seeds = seeds.to(torch.int64) & 0xFFFFFFFF
    make = fused_box_muller() if fused and seeds.is_cuda else box_muller

    def noise(key, shape):
        stream = _hash32(_hash32(seeds) ^ _hash32(key & 0xFFFFFFFF))  # the key is hashed as a python int
        return make(stream, math.prod(shape[1:])).view(shape)

    return noise


def box_muller(stream, per_image):
    """(B, per_image) float32 N(0, 1) values from each image's stream (B,): two hashed 32-bit counters per value,
    through Box-Muller in float64."""
    counter = torch.arange(2 * per_image, device=stream.device, dtype=torch.int64)
    bits = _hash32(_hash32(counter[None, :] ^ stream[:, None]) + stream[:, None] & 0xFFFFFFFF)
    u = (bits.double() + 0.5) / 2 ** 32  # in (0, 1): the log below is finite
    u1, u2 = u[:, :per_image], u[:, per_image:]
    return ((-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)).float()


@functools.cache
def fused_box_muller():
    """box_muller as one Inductor kernel. Eagerly, its ~40 integer and float64 operations each read and write the
    whole (B, 2 x pixels) array: about 1 TB per 100-step chain of 1,000 images at 64 px, a quarter of a second at an
    H200's copy bandwidth (bytes counted on the CPU). Fused, only the noise is written. Integer arithmetic is exact
    and the float64 functions come from the same device library, so it should equal the eager noise (a CUDA test
    checks it)."""
    return torch.compile(box_muller, dynamic=False, fullgraph=True)


def generator_noise(generator=None, device="cpu"):
    """The plain noise source: torch.randn from one generator."""
    return lambda key, shape: torch.randn(shape, generator=generator, device=device)


# -----------------------------------------------------------------------------
# Samplers


def sampling_steps(ss, steps=None):
    """The steps a sampler visits, descending from T-1 to 0 (METHOD.md §4, respacing).

    steps = None visits all T. Otherwise `steps` are spread over the levels in proportion to their length, evenly
    inside each level, and the first step of every level (each resolution-changing step) is always kept: the network
    at a kept step t predicts at r(t-1), which must be the resolution of the next kept step.
    """
    if steps is None or steps >= ss.T:
        return list(range(ss.T - 1, -1, -1))
    bounds = [0] + ss.transitions + [ss.T]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if steps < len(lengths) + 1:
        raise ValueError(f"{ss.levels} levels need at least {len(lengths) + 1} sampling steps, got {steps}")
    # Largest-remainder split of the steps over the levels, at least one per level and two on the top level
    # (its first step and T-1, where sampling starts).
    share = [steps * n / ss.T for n in lengths]
    count = [max(1, int(x)) for x in share]
    count[-1] = max(count[-1], 2)
    for k in sorted(range(len(count)), key=lambda k: count[k] - share[k]):
        if sum(count) >= steps:
            break
        count[k] += 1
    while sum(count) > steps:  # the minimums may overshoot: take back from the longest level
        count[max(range(len(count)), key=lambda k: count[k])] -= 1
    kept = []
    for (a, b), n in zip(zip(bounds, bounds[1:]), count):
        kept += torch.linspace(a, b - 1, n, dtype=torch.float64).round().long().tolist() if n > 1 else [a]
    return sorted(set(kept), reverse=True)


def ddim_step(ss, x_t, x0_hat, t, s, xi):
    """A deterministic DDIM-style step x_t -> x_s (METHOD.md §4, beyond the paper).

    Derivation. Write x_t = c R mu_s + sigma_t eps_t with mu_s = a_s R_{1:s} x_0, c = sqrt(abar_t / abar_s), eps_t
    ~ N(0, I) at r(t). DDIM keeps the noise and moves the signal: x_s = mu_s + sigma_s eps_s, with eps_s built from
    eps_t so that eps_s ~ N(0, I) at r(s) given x_0 (the marginal q(x_s | x_0) is then exact). Inside a level R = I and
    eps_s = eps_t, which is DDIM with eta = 0: x_s = mu_s + (sigma_s / sigma_t)(x_t - c mu_s). Across a resolution
    change eps_t has fewer dimensions than eps_s. Let Q = R^T (R R^T)^(-1/2), an isometry (Q^T Q = I) onto the row
    space of R: the directions x_t carries. Then eps_s = Q eps_t + (I - Q Q^T) xi with fresh xi ~ N(0, I) has
    covariance Q Q^T + (I - Q Q^T) = I: the low frequencies are inherited deterministically, the detail that x_t
    cannot know (the null space of R) is drawn fresh. The sampler estimates eps_t = (x_t - c R a_s x_hat) / sigma_t.
    At t = 0 it returns the clean prediction.
    """
    if t == 0:
        return x0_hat
    c, rho, R = ss.pair(t, s)
    mu_s = float(ss.a[s]) * x0_hat
    eps_t = (x_t - c * R(mu_s)) / float(ss.sigma[t])
    if R.in_size == R.out_size:
        eps_s = eps_t
    else:
        Q = R.row_space_isometry()
        eps_s = Q(eps_t) + xi - Q(Q.T(xi))
    return mu_s + float(ss.sigma[s]) * eps_s


SAMPLERS = ("ancestral", "ddim")  # the exact posterior steps (the paper's), or the DDIM-style ones


def sample(denoise, ss, n, channels, steps=None, method="ancestral", noise=None, record=(), x0_error=None):
    """Draw n images at full resolution.

    method: "ancestral" (exact posterior steps, METHOD.md §2; all T steps, or `steps` respaced ones) or "ddim".
    noise(key, shape) gives unit Gaussian noise (keys: T for the start, t for the step leaving t, T + 1 + t for the
    x_0 uncertainty at t); default torch.randn.
    record: steps at which to keep (t, x_t, x_hat) on the CPU, for progression figures.
    x0_error: {t: errors} from measure_x0_error: at those steps the step (ancestral or DDIM-style) takes x_0 drawn
    around x_hat with the denoiser's measured errors instead of x_hat itself (METHOD.md §4).
    Returns the images, or (images, progression) when record is given.
    """
    noise = noise or generator_noise()
    x0_error = x0_error or {}
    kept = sampling_steps(ss, steps)
    top = ss.res(ss.T - 1)
    x = noise(ss.T, (n, channels, top, top))  # x_{T-1} ~ N(0, I) at the lowest resolution
    progression = []
    for i, t in enumerate(kept):
        x0_hat = denoise(x, t)
        if t in record:
            progression.append((t, x.cpu(), x0_hat.cpu()))
        if t == 0:
            x = x0_hat
            break
        s = kept[i + 1]
        xi = noise(t, x0_hat.shape)
        if t in x0_error:
            x0_hat = draw_x0(x0_hat, x0_error[t], noise(ss.T + 1 + t, (len(x0_hat), len(x0_error[t]))))
        x = ss.p_step(x, x0_hat, t, s, xi=xi) if method == "ancestral" else ddim_step(ss, x, x0_hat, t, s, xi)
    return (x, progression) if record else x


# -----------------------------------------------------------------------------
# The uncertainty of x_0 (project option, beyond the paper)

X0_UNCERTAINTY = ("none", "transitions", "all")  # where the sampler draws x_0: nowhere (the paper), or at these steps


def uncertain_steps(ss, steps=None, at="transitions"):
    """The kept steps where the sampler draws x_0: the resolution changes, or every step but the last."""
    if at not in X0_UNCERTAINTY[1:]:
        raise ValueError(f"unknown x_0 uncertainty {at!r}: choose 'transitions' or 'all'")
    return [t for t in sampling_steps(ss, steps) if t > 0 and (at == "all" or t in ss.transitions)]


def measure_x0_error(denoise, ss, batches, steps=None, at="transitions", generator=None):
    """The denoiser's errors at each step of uncertain_steps, for draw_x0 (METHOD.md §4).

    batches: clean images x_0 (NCHW, full resolution, on the denoiser's device). For each image and step, x_t is
    drawn from q(x_t | x_0) and the error e = R_{1:s} x_0 - x_hat(x_t) is kept. Returns {t: errors (N, C, r, r)}.
    """
    chosen = uncertain_steps(ss, steps, at)
    errors = {t: [] for t in chosen}
    for x0 in batches:
        for t in chosen:
            r = ss.res(t)
            eps = torch.randn(x0.shape[0], x0.shape[1], r, r, generator=generator, device=x0.device, dtype=x0.dtype)
            errors[t].append(ss.target(x0, t) - denoise(ss.q_sample(x0, t, eps), t))
    return {t: torch.cat(e) for t, e in errors.items()}


def draw_x0(x0_hat, errors, z):
    """x_hat plus a Gaussian combination of N measured errors, sum_i z_i e_i / sqrt(N), with z (B, N) unit noise: a
    draw from N(x_hat, E), E = (1/N) sum_i e_i e_i^T the errors' second moment.

    Why. The ancestral step plugs x_hat into q(x_s | x_t, x_0) as if x_0 were known. The step that minimises the
    KL divergence to the true reverse step among Gaussians has the mean of q with x_hat and the covariance of q plus
    M E M^T, where M = d(mean)/d(x_0) and E is the covariance of the error x_0 - x_hat (Bao et al., Analytic-DPM,
    ICLR 2022). Since the posterior mean is linear in x_0, the step from x_0 ~ N(x_hat, E) has exactly that
    covariance. A short step barely needs it (M is small); a resolution change, where the state gains about four
    times the signal-to-noise ratio of its low frequencies and all its new detail at once, does. The DDIM-style step
    keeps q(x_s | x_0) too, so with x_0 drawn from p(x_0 | x_t) it also lands on q(x_s) exactly.
    """
    combination = z.to(errors.dtype) @ errors.flatten(1) / math.sqrt(len(errors))
    return x0_hat + combination.view_as(x0_hat).to(x0_hat.dtype)


def network_denoiser(net, ss, y=None, cfg_scale=1.0, parameterisation="x0", clip=True):
    """Wrap a network net(x, t, out_res, y) as a denoiser: bf16 autocast on CUDA, clamp to [-1, 1] (METHOD.md §4).

    Classifier-free guidance (cfg_scale != 1 with labels y): x_hat = u + w (c - u), u from the null label (y = None).
    eps-prediction (one level) is turned into x_hat = (x_t - sigma_t eps) / a_t.
    """
    def run(x, t, labels):
        steps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
            return net(x, steps, ss.sizes[ss.target_level(t)], labels).float()

    def denoise(x_t, t):
        out = run(x_t, t, y)
        if y is not None and cfg_scale != 1.0:
            uncond = run(x_t, t, None)
            out = uncond + cfg_scale * (out - uncond)
        if parameterisation == "eps":
            out = (x_t - float(ss.sigma[t]) * out) / float(ss.a[t])
        return out.clamp(-1, 1) if clip else out

    return denoise
