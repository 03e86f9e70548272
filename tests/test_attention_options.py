"""The project options of the UNet: qk_norm, attention_fp32, upsample_into_full and upsample_transitions
(flexi_unet.py)."""
import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flexi_unet import Attention, UNet, paper_config, parameter_count, path_gflops, tiny_config
from helpers import randomized


def inputs(res, batch=2, channels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, res, res, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def attention(ch=32, heads=2, groups=8, qkv_std=10.0, seed=0, **options):
    """An Attention layer with large random qkv weights (large logits) and a random output projection."""
    torch.manual_seed(seed)
    layer = Attention(ch, heads, groups, **options)
    with torch.no_grad():
        layer.qkv.weight.normal_(std=qkv_std / math.sqrt(ch))
        layer.qkv.bias.normal_()
        layer.proj.weight.normal_(std=1 / math.sqrt(ch))
        layer.proj.bias.normal_(std=0.1)
    return layer


def raw_qkv(layer, x):
    """q, k, v of the layer without any normalisation, computed from its weights: (B, heads, tokens, d) each."""
    B, C, H, W = x.shape
    tokens = layer.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C), pixels in row-major order
    qkv = tokens @ layer.qkv.weight.T + layer.qkv.bias
    d = C // layer.heads
    return [part.reshape(B, H * W, layer.heads, d).transpose(1, 2) for part in qkv.split(C, dim=-1)]


# -----------------------------------------------------------------------------
# qk_norm


def test_qk_norm_gives_unit_rms_queries_and_keys_times_the_gains():
    layer = attention(qk_norm=True)
    d = 16
    with torch.no_grad():
        layer.q_gain.copy_(torch.linspace(-3, 2, d))
        layer.k_gain.copy_(torch.linspace(0.5, 1.5, d).flip(0))
        x = torch.randn(3, 32, 4, 4) * 5
        q, k, v = layer.project(x)
        q_raw, k_raw, v_raw = raw_qkv(layer, x)
    assert q.shape == k.shape == v.shape == (3, 2, 16, d)
    assert q_raw.square().mean(-1).sqrt().min() > 3  # large projections: the norm has work to do
    torch.testing.assert_close((q / layer.q_gain).square().mean(-1).sqrt(), torch.ones(3, 2, 16))
    torch.testing.assert_close((k / layer.k_gain).square().mean(-1).sqrt(), torch.ones(3, 2, 16))
    rms = lambda a: a.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(q, q_raw / rms(q_raw) * layer.q_gain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_raw / rms(k_raw) * layer.k_gain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v_raw, rtol=1e-5, atol=1e-4)  # values are not normalised


def test_qk_norm_bounds_the_logits_by_the_gains():
    d = 16
    for seed in range(3):
        normed = attention(qk_norm=True, seed=seed, qkv_std=30.0)
        plain = attention(seed=seed, qkv_std=30.0)
        with torch.no_grad():
            normed.q_gain.normal_(std=2.0)
            normed.k_gain.normal_(std=0.5)
            x = torch.randn(2, 32, 4, 4)
            q, k, _ = normed.project(x)
            logits = (q @ k.transpose(-1, -2)).abs().max() / math.sqrt(d)
            bound = math.sqrt(d) * normed.q_gain.abs().max() * normed.k_gain.abs().max()
            q0, k0, _ = plain.project(x)
            unbounded = (q0 @ k0.transpose(-1, -2)).abs().max() / math.sqrt(d)
        assert 0 < logits <= bound * (1 + 1e-5)
        assert unbounded > 10 * bound  # the same weights without the norm: logits grow with the qkv weights


def test_qk_norm_bound_is_reached_when_keys_equal_queries():
    """With k = q (the key rows of the projection copied from the query rows) and unit gains, a token's logit
    with itself is |q|^2 / sqrt(d) = sqrt(d): the bound, however large the weights."""
    layer = attention(qk_norm=True, qkv_std=50.0)
    with torch.no_grad():
        layer.qkv.weight[32:64] = layer.qkv.weight[:32]
        layer.qkv.bias[32:64] = layer.qkv.bias[:32]
        q, k, _ = layer.project(torch.randn(2, 32, 4, 4))
    logits = q @ k.transpose(-1, -2) / math.sqrt(16)
    torch.testing.assert_close(logits.diagonal(dim1=-2, dim2=-1), torch.full((2, 2, 16), 4.0))
    assert logits.abs().max() <= 4.0 * (1 + 1e-5)


def test_qk_norm_gains_are_trainable_parameters_initialised_to_one():
    model = UNet(tiny_config(16, 2, qk_norm=True))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    assert set(layers) == {"encoder.4.attn", "middle.0.attn", "decoder.0.attn", "decoder.1.attn"}
    params = dict(model.named_parameters())
    for name, layer in layers.items():
        d = layer.qkv.in_features // layer.heads
        for gain in ("q_gain", "k_gain"):
            p = params[f"{name}.{gain}"]
            assert p.requires_grad and p.shape == (d,) and torch.equal(p, torch.ones(d))
    gains = [p for n, p in model.named_parameters() if n.endswith("_gain")]
    assert len(gains) == 8
    # they learn: random weights elsewhere (the zero-initialised output projections would block the gradient)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.endswith("_gain"):
                p.normal_(std=0.2, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t = inputs(8)
    model(x, t, 16).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in gains)
    opt.step()
    assert all(not torch.equal(p, torch.ones_like(p)) for p in gains)


def test_without_qk_norm_there_are_no_gains_and_the_paper_count_stands():
    model = UNet(tiny_config(16, 2))
    assert not [n for n, _ in model.named_parameters() if "gain" in n]
    assert all(m.q_gain is None and m.k_gain is None for m in model.modules() if isinstance(m, Attention))
    with torch.device("meta"):
        paper = UNet(paper_config(64, 4))
        plain = UNet(paper_config(64, 4, qk_norm=False))
        normed = UNet(paper_config(64, 4, qk_norm=True))
    assert parameter_count(paper) == parameter_count(plain)
    assert parameter_count(paper) / 1e6 == pytest.approx(92.26, abs=0.01)  # paper Table 2
    layers = [m for m in normed.modules() if isinstance(m, Attention)]
    extra = sum(2 * m.qkv.in_features // m.heads for m in layers)
    assert parameter_count(normed) - parameter_count(plain) == extra > 0


def test_qk_norm_off_is_the_plain_attention():
    """A qk_norm=False layer computes softmax(q k^T / sqrt(d)) v with q, k, v straight from the projection."""
    layer = attention(qkv_std=1.0)
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        q, k, v = raw_qkv(layer, x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(2, 16, 32) @ layer.proj.weight.T + layer.proj.bias
        expected = x + out.transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# attention_fp32


def test_attention_fp32_equals_the_default_in_float32():
    for qk_norm in (False, True):
        default = attention(qkv_std=3.0, qk_norm=qk_norm)
        fp32 = copy.deepcopy(default)
        fp32.fp32 = True
        x = torch.randn(2, 32, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fp32(x), default(x), rtol=0, atol=1e-6)


def test_attention_fp32_reaches_every_layer_of_the_model():
    config = tiny_config(16, 2)
    model = randomized(UNet(config))
    fp32 = UNet(replace(config, attention_fp32=True))
    fp32.load_state_dict(model.state_dict())
    assert all(m.fp32 for m in fp32.modules() if isinstance(m, Attention))
    assert not any(m.fp32 for m in model.modules() if isinstance(m, Attention))
    x, t = inputs(8)
    with torch.no_grad():
        for out_res in (8, 16):
            torch.testing.assert_close(fp32(x, t, out_res), model(x, t, out_res), rtol=1e-6, atol=1e-6)


def bf16_errors(scale, seeds=4):
    """Max error relative to the largest float64 output under bf16 autocast: (default, attention_fp32), per seed."""
    errors = []
    for seed in range(seeds):
        default = attention(ch=64, qkv_std=scale, seed=seed)
        fp32 = copy.deepcopy(default)
        fp32.fp32 = True
        x = torch.randn(4, 64, 8, 8, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            reference = copy.deepcopy(default).double()(x.double())
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            outs = default(x), fp32(x)
        errors.append([float((o.double() - reference).abs().max() / reference.abs().max()) for o in outs])
    return errors


def test_attention_fp32_is_not_worse_under_bf16_autocast():
    for scale in (1.0, 3.0, 6.0):
        errors = bf16_errors(scale)
        mean_default = sum(e[0] for e in errors) / len(errors)
        mean_fp32 = sum(e[1] for e in errors) / len(errors)
        print(f"qkv scale {scale}: max error / max |output| vs float64, default {mean_default:.3e}, "
              f"attention_fp32 {mean_fp32:.3e}")
        # q and k are rounded to bf16 by the qkv projection before the option applies; that rounding dominates
        # the error on the CPU, so float32 attention need not be measurably closer, but must not be worse
        assert mean_fp32 <= mean_default * 1.05
        assert mean_default < 0.5  # bf16 rounding, not a broken computation


def test_attention_fp32_runs_the_attention_in_float32_under_autocast():
    layer = attention(ch=64, qkv_std=6.0, fp32=True)
    x = torch.randn(4, 64, 8, 8)
    B, C, H, W = x.shape
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
        q, k, v = layer.project(x)
        with torch.autocast("cpu", enabled=False):
            attended = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
        expected = x + layer.proj(attended.transpose(1, 2).reshape(B, H * W, C)).view(B, H, W, C).permute(0, 3, 1, 2)
        layer.fp32 = False
        default = layer(x)
    assert not torch.equal(out, default)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# upsample_into_full


def pair(levels, seed=0, option="upsample_into_full"):
    """The same random weights with the option off and on."""
    config = tiny_config(16, levels)
    ours = randomized(UNet(config), seed)
    theirs = UNet(replace(config, **{option: True}))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def bilinear_up(x, res):
    return F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("levels", [2, 3])
def test_upsample_into_full_runs_the_full_resolution_path_on_the_upsampled_input(levels):
    ours, theirs = pair(levels)
    x, t = inputs(8)
    with torch.no_grad():
        routed = theirs(x, t, 16)
        torch.testing.assert_close(routed, ours(bilinear_up(x, 16), t, 16), rtol=1e-6, atol=1e-6)
        assert (routed - ours(x, t, 16)).abs().max() > 1e-2  # not the zero-skip route
    assert path_gflops(theirs, 8, 16) == pytest.approx(path_gflops(theirs, 16, 16), rel=1e-9)
    assert path_gflops(theirs, 8, 16) > path_gflops(ours, 8, 16)


@pytest.mark.parametrize("levels", [2, 3])
def test_upsample_into_full_leaves_the_other_paths_alone(levels):
    ours, theirs = pair(levels)
    paths = [(16, 16), (8, 8)] + ([(4, 4), (4, 8)] if levels == 3 else [])
    with torch.no_grad():
        for in_res, out_res in paths:
            x, t = inputs(in_res)
            assert torch.equal(theirs(x, t, out_res), ours(x, t, out_res)), (in_res, out_res)


def test_upsample_transitions_runs_each_output_levels_own_path_on_the_upsampled_input():
    """Every resolution increase, not only the one into full resolution, takes the route; the rest are unchanged."""
    ours, routed = pair(3, option="upsample_transitions")
    with torch.no_grad():
        for in_res, out_res in ((8, 16), (4, 8)):
            x, t = inputs(in_res)
            out = routed(x, t, out_res)
            torch.testing.assert_close(out, ours(bilinear_up(x, out_res), t, out_res), rtol=1e-6, atol=1e-6)
            assert (out - ours(x, t, out_res)).abs().max() > 1e-2, (in_res, out_res)  # not the zero-skip route
            assert path_gflops(routed, in_res, out_res) == pytest.approx(path_gflops(routed, out_res, out_res),
                                                                         rel=1e-9)
        for res in (16, 8, 4):
            x, t = inputs(res)
            assert torch.equal(routed(x, t, res), ours(x, t, res)), res


def test_upsample_transitions_trains_through_train_py(tmp_path):
    """The setting reaches the network, is stored in the checkpoint's spec, and a resumed run must repeat it."""
    import train
    argv = ["--out_dir", str(tmp_path), "--res", "16", "--max_steps", "2", "--batch_size", "4", "--sample_every", "0",
            "--transition_share", "1.0", "--cache_dir", str(tmp_path / "cache")]
    run = train.main(argv + ["--upsample_transitions", "True"])
    assert run.model.config.upsample_transitions and run.spec["unet"]["upsample_transitions"]
    with pytest.raises(ValueError, match="upsample_transitions: checkpoint True vs now False"):
        train.main(argv + ["--max_steps", "3", "--resume", "True"])


def test_bilinear_antialias_is_plain_bilinear_when_enlarging():
    x = torch.randn(2, 3, 8, 8)
    plain = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear_up(x, 16), plain, rtol=1e-6, atol=1e-6)
