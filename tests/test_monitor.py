"""monitor.py: the per-block measurements, the log line, the run log and the divergence check."""
import copy
import json
import math

import pytest
import torch
from torch._dynamo.utils import counters

from flexi_unet import Attention, UNet, tiny_config
from helpers import randomized
from monitor import (DIVERGENCE_FACTOR, Monitor, RunLog, Window, attention_logits, block_of, check_divergence,
                     json_safe)


def inputs(res, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, res, res, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def backward(model, res, out_res, seed=1, scale=1.0):
    model.zero_grad(set_to_none=True)
    x, t = inputs(res, seed=seed)
    (scale * model(x, t, out_res).square().mean()).backward()
    return [p for p in model.parameters() if p.grad is not None]


def block_norms_by_hand(model, attr):
    """{block: the 2-norm of the concatenated tensors `attr(p)` of its parameters that have one}."""
    parts = {}
    for name, p in model.named_parameters():
        value = attr(name, p)
        if value is not None:
            parts.setdefault(block_of(name), []).append(value.detach().double().flatten())
    return {block: float(torch.cat(values).norm()) for block, values in parts.items()}


# -----------------------------------------------------------------------------
# blocks


@pytest.mark.parametrize("name,block", [
    ("encoder.3.res.conv1.weight", "encoder.3"),
    ("head.2.weight", "head"),
    ("base.decoder.1.attn.qkv.bias", "base.decoder.1"),
    ("in_adapters.2.weight", "in_adapters.2"),
    ("out_adapters.0.bias", "out_adapters.0"),
    ("middle.0.attn.q_gain", "middle.0"),
    ("stem.weight", "stem"),
    ("time_embed.2.weight", "time_embed"),
    ("label_embed.weight", "label_embed"),
    ("residual.head.0.weight", "residual.head"),
    ("residual.encoder.10.res.skip.weight", "residual.encoder.10"),
    ("encoder", "encoder"),  # a module name without an index: the name itself
    ("something.else", "something.else"),
])
def test_block_of(name, block):
    assert block_of(name) == block


def test_blocks_are_every_parameter_owner_in_model_order():
    model = UNet(tiny_config(16, 2))
    monitor = Monitor(model)
    assert monitor.blocks == list(dict.fromkeys(block_of(n) for n, _ in model.named_parameters()))
    assert monitor.blocks[:2] == ["time_embed", "stem"] and monitor.blocks[-1] == "head"
    assert "decoder.5" in monitor.blocks and "in_adapters.1" not in monitor.blocks  # an identity has no weights
    modules = dict(model.named_modules())
    assert all(block in modules for block in monitor.blocks)  # forward_maxima hooks these modules by name


# -----------------------------------------------------------------------------
# gradient norms


def test_gradient_norm_total_is_bitwise_get_total_norm_and_blocks_match_a_hand_count():
    model = randomized(UNet(tiny_config(16, 2)))
    monitor = Monitor(model)
    trained = backward(model, 8, 16)
    total = monitor.gradient_norm("8->16", trained)
    expected = torch.nn.utils.get_total_norm([p.grad for p in trained])
    assert total.dtype == expected.dtype and torch.equal(total, expected)
    hand = block_norms_by_hand(model, lambda n, p: p.grad)
    window = dict(zip(monitor.blocks, monitor.window.tolist()))
    for block, value in window.items():
        if block in hand:
            assert value == pytest.approx(hand[block], rel=1e-5), block
        else:  # off the path: no gradient, a norm of 0
            assert value == 0.0, block
    assert {"encoder.0", "encoder.1", "decoder.5"} <= set(window) - set(hand)  # 8 -> 16 enters below level 0
    assert all(hand[b] > 0 for b in ("stem", "encoder.2", "middle.0", "decoder.4", "head"))


def test_gradient_norm_window_keeps_the_maximum_and_record_resets_it():
    model = randomized(UNet(tiny_config(16, 2)))
    monitor = Monitor(model)
    calls = [("16->16", 16, 16, 1.0), ("8->8", 8, 8, 50.0), ("16->16", 16, 16, 0.01)]
    seen = []
    for path, res, out_res, scale in calls:
        trained = backward(model, res, out_res, scale=scale)
        monitor.gradient_norm(path, trained)
        hand = block_norms_by_hand(model, lambda n, p: p.grad)
        seen.append([hand.get(b, 0.0) for b in monitor.blocks])
    expected = [max(values) for values in zip(*seen)]
    torch.testing.assert_close(monitor.window.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5,
                               atol=0)
    # the largest comes from different calls in different blocks: not just the last or one call's values
    assert seen[1][monitor.blocks.index("middle.0")] > seen[0][monitor.blocks.index("middle.0")]
    assert seen[0][monitor.blocks.index("encoder.0")] > seen[1][monitor.blocks.index("encoder.0")] == 0
    record = monitor.record()
    assert set(record) == {"grad_norm_per_block"}
    assert record["grad_norm_per_block"].keys() == set(monitor.blocks)
    for block, value in zip(monitor.blocks, expected):
        assert record["grad_norm_per_block"][block] == pytest.approx(value, rel=1e-3), block
    assert monitor.window is None
    assert monitor.record() == {}  # the window starts afresh
    trained = backward(model, 16, 16, scale=0.01)
    monitor.gradient_norm("16->16", trained)
    hand = block_norms_by_hand(model, lambda n, p: p.grad)
    assert monitor.record()["grad_norm_per_block"]["middle.0"] == pytest.approx(hand["middle.0"], rel=1e-3)


# -----------------------------------------------------------------------------
# update sizes


def test_update_ratios_equal_a_hand_count_around_an_optimizer_step():
    model = randomized(UNet(tiny_config(16, 2)))
    monitor = Monitor(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    trained = backward(model, 8, 8)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    monitor.before_update(trained)
    opt.step()
    ratios = monitor.update_ratios()
    assert monitor.before is None
    on_path = {n for n, p in model.named_parameters() if p.grad is not None}
    delta = block_norms_by_hand(model, lambda n, p: p - old[n] if n in on_path else None)
    weight = block_norms_by_hand(model, lambda n, p: old[n] if n in on_path else None)
    got = dict(zip(monitor.blocks, ratios.tolist()))
    for block in monitor.blocks:
        if block in weight:
            assert got[block] == pytest.approx(delta[block] / weight[block], rel=1e-4), block
            assert got[block] > 0
        else:
            assert math.isnan(got[block]), block
    record = monitor.record(updates=ratios)
    assert set(record) == {"update_ratio_per_block"}  # no gradient_norm call: no window
    logged = record["update_ratio_per_block"]
    assert set(logged) == set(weight)
    assert {"encoder.0", "encoder.1", "decoder.3", "decoder.4", "decoder.5", "out_adapters.0"}.isdisjoint(logged)
    assert {"stem", "encoder.2", "middle.1", "decoder.2", "out_adapters.1", "head"} <= set(logged)
    for block, value in logged.items():
        assert value == pytest.approx(delta[block] / weight[block], rel=1e-3), block


# -----------------------------------------------------------------------------
# activations and attention logits


def by_hand_maxima(model, run):
    """Per block the max |output|, per Attention the max |q.k| / sqrt(d), from hooks on an eager model."""
    act, logit, handles = {}, {}, []
    blocks = dict.fromkeys(block_of(n) for n, _ in model.named_parameters())
    for name, module in model.named_modules():
        if name in blocks:
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: act.setdefault(name, []).append(float(out.abs().max()))))
        if isinstance(module, Attention):
            def pre(m, args, name=name):
                q, k, _ = m.project(args[0])
                logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / math.sqrt(q.shape[-1])
                logit.setdefault(block_of(name), []).append(float(logits.abs().max()))
            handles.append(module.register_forward_pre_hook(pre))
    model.eval()
    with torch.no_grad():
        run(model)
    for handle in handles:
        handle.remove()
    return {b: max(v) for b, v in act.items()}, {b: max(v) for b, v in logit.items()}


@pytest.mark.parametrize("training", [True, False])
def test_forward_maxima_on_compiled_blocks(training):
    torch._dynamo.reset()
    eager = randomized(UNet(tiny_config(16, 2, dropout=0.3)))
    model = copy.deepcopy(eager).compile_blocks(backend="eager")
    model.train(training)
    x, t = inputs(8)
    model(x, t, 16)  # compiles the blocks of the path
    model(x, t, 8)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    monitor = Monitor(model)
    rng = torch.get_rng_state()
    act, logit = monitor.forward_maxima(lambda: model(x, t, 16))
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: dropout drew nothing
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    model(x, t, 16)  # the normal compiled call: the hooks are gone and nothing recompiles
    model(x, t, 8)
    assert counters["stats"]["unique_graphs"] == graphs

    hand_act, hand_logit = by_hand_maxima(eager, lambda m: m(x, t, 16))
    assert set(hand_logit) == {"encoder.4", "middle.0", "decoder.0", "decoder.1"}  # attention at 4 px
    for i, block in enumerate(monitor.blocks):
        if block in hand_act:
            assert act[i].item() == pytest.approx(hand_act[block], rel=1e-5), block
        else:
            assert math.isnan(act[i]), block
        if block in hand_logit:
            assert logit[i].item() == pytest.approx(hand_logit[block], rel=1e-5), block
        else:
            assert math.isnan(logit[i]), block
    assert not {"encoder.0", "encoder.1", "decoder.5"} & set(hand_act)  # off the 8 -> 16 path
    record = monitor.record(maxima=(act, logit))
    assert record["act_max_per_block"].keys() == hand_act.keys()
    for block, value in hand_act.items():
        assert record["act_max_per_block"][block] == pytest.approx(value, rel=1e-3), block
    assert set(record["attn_logit_max_per_block"]) == set(hand_logit)


def test_attention_logits_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = Attention(32, 2, 8)
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        q, k, _ = layer.project(x)
        logits = attention_logits(layer, x)
    expected = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(16)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-6, atol=1e-6)


def test_forward_maxima_removes_its_hooks_even_when_the_pass_fails():
    model = randomized(UNet(tiny_config(16, 2)))
    model.train()
    monitor = Monitor(model)

    def failing():
        model(*inputs(8), 16)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        monitor.forward_maxima(failing)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


# -----------------------------------------------------------------------------
# the log line


def test_window_record_means_per_path_and_step_weighted_overall():
    window = Window()
    steps = [("16->16", 1.0, 3.0), ("8->8", 10.0, 1.0), ("16->16", 2.0, 5.0), ("16->16", 6.0, 4.0),
             ("8->8", 20.0, 2.0)]
    for path, loss, norm in steps:
        window.add(path, torch.tensor(loss), torch.tensor(norm), flops=1e9)
    record = window.record(step=5, images_seen=320, batch_size=64, device=torch.device("cpu"), peak_flops=1e12)
    assert record["step"] == 5 and record["images_seen"] == 320
    assert record["loss_per_path"] == {"16->16": pytest.approx(3.0), "8->8": pytest.approx(15.0)}
    assert record["loss"] == pytest.approx((1 + 10 + 2 + 6 + 20) / 5)  # the mean over steps, not over paths
    assert record["loss"] != pytest.approx((3.0 + 15.0) / 2)
    assert record["grad_norm_per_path"] == {"16->16": 5.0, "8->8": 2.0}
    assert record["ms_per_step"] > 0 and record["images_per_s"] > 0
    seconds = record["ms_per_step"] * 5 / 1000
    assert record["mfu"] == pytest.approx(5e9 / seconds / 1e12, rel=1e-9)
    assert "peak_mem_gb" not in record
    json.dumps(record)  # plain numbers only


def test_json_safe_turns_non_finite_numbers_into_null():
    record = {"step": 3, "loss": float("nan"), "ok": 1.5, "loss_per_path": {"a": float("inf"), "b": -float("inf"),
                                                                            "c": 2.0}, "name": "x"}
    safe = json_safe(record)
    assert safe == {"step": 3, "loss": None, "ok": 1.5, "loss_per_path": {"a": None, "b": None, "c": 2.0},
                    "name": "x"}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
    assert math.isnan(record["loss"])  # the input is left as it was


def write_lines(path, steps):
    with open(path, "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")


def read_steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def test_run_log_resumed_drops_the_lines_after_the_checkpoint(tmp_path):
    path = str(tmp_path / "log.jsonl")
    write_lines(path, [50, 100, 150, 200])
    log = RunLog(path, resumed_step=100)
    assert read_steps(path) == [50, 100]  # on disk before the first new line
    log.write({"step": 150, "loss": float("nan")})
    log.close()
    assert read_steps(path) == [50, 100, 150]
    with open(path) as f:
        lines = f.read().splitlines()
    assert json.loads(lines[0]) == {"step": 50, "loss": 0.02}
    assert json.loads(lines[2]) == {"step": 150, "loss": None}


def test_run_log_without_resume_starts_a_new_file(tmp_path):
    path = str(tmp_path / "log.jsonl")
    write_lines(path, [50, 100])
    RunLog(path).close()
    assert read_steps(path) == []
    RunLog(str(tmp_path / "new.jsonl"), resumed_step=100).close()  # resuming with no log yet
    assert read_steps(str(tmp_path / "new.jsonl")) == []


# -----------------------------------------------------------------------------
# divergence


def params(finite=True):
    p = [torch.ones(3), torch.zeros(2, 2)]
    if not finite:
        p[1][0, 1] = float("nan")
    return p


def record_of(step, **losses):
    return {"step": step, "loss": sum(losses.values()) / len(losses),
            "loss_per_path": {k.replace("_", "->"): v for k, v in losses.items()}}


def test_check_divergence_passes_normal_records_and_keeps_their_history():
    history = {}
    for step, (a, b) in enumerate([(1.0, 1e-4), (0.9, 2e-4), (1.1, 1e-4), (1.0, 1.5e-4)], start=1):
        check_divergence(record_of(step, p16_16=a, p8_8=b), params(), history, None, "out/ckpt.pt")
    assert history == {"p16->16": [1.0, 0.9, 1.1, 1.0], "p8->8": [1e-4, 2e-4, 1e-4, 1.5e-4]}


def test_paths_far_apart_from_each_other_do_not_count_as_divergence():
    history = {"a": [1e-4] * 5, "b": [1.0] * 5}
    check_divergence({"step": 6, "loss": 0.5, "loss_per_path": {"a": 1e-4, "b": 1.0}}, params(), history, 5,
                     "ckpt.pt")  # b is 1e4 x a
    check_divergence({"step": 7, "loss": 0.5, "loss_per_path": {"b": 50.0}}, params(), history, 5, "ckpt.pt")
    assert history["b"][-1] == 50.0  # 50x its median: not yet diverged


def test_one_path_far_above_its_own_median_stops_the_run():
    history = {"a": [1e-4, 2e-4, 1e-4], "b": [1.0, 1.0, 1.0]}
    record = {"step": 300, "loss": 0.5, "loss_per_path": {"a": 1e-4 * (DIVERGENCE_FACTOR + 5), "b": 1.0}}
    with pytest.raises(FloatingPointError, match=r"path a\b") as info:
        check_divergence(record, params(), history, 250, "out/ckpt.pt")
    message = str(info.value)
    assert "step 300" in message and "step 250" in message and "out/ckpt.pt" in message
    assert "\n" not in message
    assert history == {"a": [1e-4, 2e-4, 1e-4], "b": [1.0, 1.0, 1.0]}  # a diverged line is not history


def test_divergence_needs_three_earlier_values_of_the_path():
    history = {"a": [1e-4, 1e-4]}
    check_divergence({"step": 3, "loss": 1.0, "loss_per_path": {"a": 1.0}}, params(), history, None, "c.pt")
    assert history["a"] == [1e-4, 1e-4, 1.0]
    with pytest.raises(FloatingPointError, match="path a"):
        check_divergence({"step": 4, "loss": 1.0, "loss_per_path": {"a": 1.0}}, params(), {"a": [1e-4] * 3}, None,
                         "c.pt")


def test_divergence_uses_the_median_of_the_recent_values():
    history = {"a": [1e-6] * 30 + [1.0] * 20}  # the last 20 decide: a loss of 50 is 50x their median
    check_divergence({"step": 51, "loss": 50.0, "loss_per_path": {"a": 50.0}}, params(), history, None, "c.pt")
    history = {"a": [1.0] * 3 + [1e-3] * 17}  # one outlier does not move a median
    with pytest.raises(FloatingPointError, match="path a"):
        check_divergence({"step": 21, "loss": 0.2, "loss_per_path": {"a": 0.2}}, params(), history, None, "c.pt")


def test_non_finite_weights_or_loss_stop_the_run():
    with pytest.raises(FloatingPointError, match="weights not finite") as info:
        check_divergence(record_of(10, a=1.0), params(finite=False), {}, 5, "out/ckpt.pt")
    assert "last good checkpoint (step 5) is kept in out/ckpt.pt" in str(info.value)
    with pytest.raises(FloatingPointError, match="loss not finite") as info:
        check_divergence(record_of(10, a=float("nan")), params(), {"a": [1.0] * 5}, None, "out/ckpt.pt")
    assert "no checkpoint yet" in str(info.value)
    with pytest.raises(FloatingPointError, match="loss not finite"):
        check_divergence(record_of(10, a=float("inf")), params(), {}, None, "out/ckpt.pt")
