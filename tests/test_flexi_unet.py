import copy
from dataclasses import replace

import pytest
import torch

from degrade import ScaleSpace
import torch.nn.functional as F
from flexi_unet import (Block, Downsample, GroupNorm, UNet, UNetConfig, Upsample, average_gflops, average_norm_values,
                        memory_format, paper_config, parameter_count, path_gflops, path_norm_values, tiny_config)


def randomized(model, seed=0):
    """The zero-initialised layers make a fresh model output zeros; random weights make every path visible."""
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def inputs(res, batch=2, channels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, res, res, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def names(prefix, indices):
    return {f"{prefix}.{i}" for i in indices}


# tiny_config(16, 3) has one res block per level, so encoder = [L0 block, down, L1 block, down, L2 block] and
# decoder = [L2 block, L2 block + upsample, L1 block, L1 block + upsample, L0 block, L0 block on the stem skip].
# Which of them each path runs, written out from the paper's routing (Sec. 4.3):
TINY_PATHS = {
    (16, 16): names("encoder", range(5)) | names("decoder", range(5)) | {"in_adapters.0", "out_adapters.0"},
    (8, 8): names("encoder", range(2, 5)) | names("decoder", range(3)) | {"in_adapters.1", "out_adapters.1"},
    (8, 16): names("encoder", range(2, 5)) | names("decoder", range(5)) | {"in_adapters.1", "out_adapters.0"},
    (4, 4): {"encoder.4", "decoder.0", "in_adapters.2", "out_adapters.2"},
    (4, 8): {"encoder.4"} | names("decoder", range(3)) | {"in_adapters.2", "out_adapters.1"},
}
ROUTED = ("encoder", "decoder", "in_adapters", "out_adapters")


def modules_run(model, x, t, out_res):
    ran = set()
    hooks = [module.register_forward_hook(lambda *_, name=f"{group}.{i}": ran.add(name))
             for group in ROUTED if hasattr(model, group) for i, module in enumerate(getattr(model, group))]
    model(x, t, out_res)
    for hook in hooks:
        hook.remove()
    return ran


@pytest.mark.parametrize("res,levels,channels", [(16, 1, 3), (16, 3, 3), (32, 2, 1), (32, 3, 3)])
def test_every_path_has_the_right_output_shape(res, levels, channels):
    model = UNet(tiny_config(res, levels, in_channels=channels))
    for k in range(levels):
        r = res >> k
        x, t = inputs(r, channels=channels)
        assert model(x, t, r).shape == (2, channels, r, r)
        if k > 0:
            assert model(x, t, 2 * r).shape == (2, channels, 2 * r, 2 * r)


def test_fresh_model_outputs_zeros():
    # ADM zero-initialises the head conv, so the untrained network predicts exactly 0 on every path.
    model = UNet(tiny_config(16, 3))
    x, t = inputs(8)
    assert model(x, t, 16).abs().max() == 0


@pytest.mark.parametrize("path", sorted(TINY_PATHS))
def test_blocks_off_the_path_never_run(path):
    model = UNet(tiny_config(16, 3))
    x, t = inputs(path[0])
    assert modules_run(model, x, t, path[1]) == TINY_PATHS[path]


def test_full_unet_runs_every_block_including_the_stem_skip_block():
    model = UNet(tiny_config(16, 3, flexi=False))
    x, t = inputs(4)
    assert modules_run(model, x, t, 8) == names("encoder", range(5)) | names("decoder", range(6))
    assert not hasattr(model, "in_adapters")


def owner(param_name):
    """The routed unit a parameter belongs to: 'decoder.3', 'in_adapters.2', or a shared part such as 'stem'."""
    parts = param_name.split(".")
    return ".".join(parts[:2]) if parts[0] in ROUTED else parts[0]


@pytest.mark.parametrize("path", [(16, 16), (8, 16), (4, 4)])
def test_gradients_reach_exactly_the_parameters_on_the_path(path):
    model = randomized(UNet(tiny_config(16, 3)))
    x, t = inputs(path[0])
    model(x, t, path[1]).square().mean().backward()
    with_grad = {owner(n) for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    without_grad = {owner(n) for n, p in model.named_parameters() if p.grad is None}
    owners = {owner(n) for n, _ in model.named_parameters()}
    expected = (TINY_PATHS[path] | {"time_embed", "stem", "middle", "head"}) & owners
    assert with_grad == expected
    assert without_grad == owners - expected
    assert "decoder.5" in without_grad  # the block on the stem skip never runs in the Flexi-UNet


def test_compiles_to_one_graph_per_path():
    # A recording backend keeps this fast on CPU; fullgraph=True fails on any graph break (data-dependent code).
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model = randomized(UNet(tiny_config(8, 2, base_channels=16, norm_groups=4)))
    compiled = torch.compile(model, backend=record, fullgraph=True)
    x, t = inputs(4)
    for out_res in (8, 4, 8):
        torch.testing.assert_close(compiled(x, t, out_res), model(x, t, out_res))
    assert len(graphs) == 2  # one static graph per path, reused on the second 4 -> 8 call


@pytest.mark.parametrize("dense_skip_grads", [True, False])
def test_regional_compilation_gives_eager_outputs_and_gradients_on_every_path(dense_skip_grads):
    """Blocks compiled once and shared by all paths (through AOTAutograd, as in training) compute what the eager
    model computes, forward and backward, whatever order the paths come in; skips joined by JoinSkip or torch.cat."""
    torch._dynamo.reset()
    eager = randomized(UNet(tiny_config(16, 3)))
    compiled = copy.deepcopy(eager).compile_blocks(dense_skip_grads=dense_skip_grads, backend="aot_eager")
    assert all(m.dense_skip_grads is dense_skip_grads for m in compiled.modules() if isinstance(m, Block))
    for in_res, out_res in [(16, 16), (8, 8), (4, 8), (16, 16), (8, 16), (4, 4), (8, 16)]:
        x, t = torch.randn(2, 3, in_res, in_res), torch.randint(0, 1000, (2,))
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            out = model(x, t, out_res)
            out.square().sum().backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys()
        for name, grad in grads[0].items():  # float32 round-off of sums in another order: ~5e-7 of the largest
            error = (grads[1][name] - grad).abs().max() / grad.abs().max()
            assert error < 1e-5, f"{in_res}->{out_res} {name}: relative error {error:.1e}"


def test_a_channels_last_model_compiles_every_block_with_the_layout_forced(monkeypatch):
    """Inductor would keep the decoder blocks' graphs (and all backward graphs) in the input's layout; a channels-last
    model asks it to force its channels-last layout optimisation in every block, and a channels-first one does not."""
    asked = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: asked.append(kwargs))
    UNet(tiny_config(16, 3)).to(memory_format=torch.channels_last).compile_blocks()
    assert asked and all(kw == dict(dynamic=False, options={"force_layout_optimization": True}) for kw in asked)
    asked.clear()
    UNet(tiny_config(16, 3)).compile_blocks()
    assert asked and all(kw == dict(dynamic=False) for kw in asked)


@pytest.mark.parametrize("flexi", [True, False])
def test_compilation_covers_every_region_once(monkeypatch, flexi):
    """The residual, attention and upsampling blocks, the downsamples and the head are compiled; no module inside
    another region is compiled twice."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(self))
    model = UNet(tiny_config(16, 3, flexi=flexi))
    model.compile_blocks()
    expected = [model.head, *(m for m in model.modules() if isinstance(m, (Block, Downsample)))]
    assert sorted(map(id, compiled)) == sorted(map(id, expected))
    assert not any(a is not b and any(a is m for m in b.modules()) for a in compiled for b in compiled)


def test_dynamo_traces_every_compiled_region():
    """Each region's own forward is in this file, so Dynamo traces it; a torch.nn module compiled on its own (a bare
    Conv2d or Sequential) would silently stay eager."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = randomized(UNet(tiny_config(16, 2))).compile_blocks(backend="eager")
    x, t = inputs(16)
    model(x, t, 16)
    regions = model.regions()
    assert counters["frames"]["ok"] >= len({type(m).forward for m in regions})
    assert all(type(m).forward.__module__ == "flexi_unet" for m in regions)
    torch._dynamo.reset()


@pytest.mark.parametrize("in_res, out_res", [(8, 16), (16, 16), (4, 4)])
def test_channels_last_gives_the_same_output_and_stays_channels_last(in_res, out_res):
    """Every block's output keeps the layout, zero skips and upsampling included: cuDNN has nothing to convert."""
    model = randomized(UNet(tiny_config(16, 3)))
    x, t = inputs(in_res)
    expected = model(x, t, out_res)
    model = model.to(memory_format=torch.channels_last)
    layouts = []
    for block in model.modules():
        if isinstance(block, (Block, Upsample)) or block in (model.stem, model.head):
            block.register_forward_hook(lambda m, args, out: layouts.append(
                (type(m).__name__, memory_format(out) is torch.channels_last or out.shape[-1] == 1)))
    out = model(x.to(memory_format=torch.channels_last), t, out_res)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert layouts and all(kept for _, kept in layouts), [name for name, kept in layouts if not kept]


def test_upsampling_follows_the_memory_order():
    up = randomized(Upsample(8))
    x = torch.randn(2, 8, 4, 4)
    plain, last = up(x), up(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(last, plain, rtol=1e-5, atol=1e-6)
    assert memory_format(last) is torch.channels_last and memory_format(plain) is torch.contiguous_format
    torch.testing.assert_close(plain, up.conv(F.interpolate(x, scale_factor=2, mode="nearest")))


def test_class_conditioning_and_null_label():
    model = randomized(UNet(tiny_config(16, 2, num_classes=3)))
    x, t = inputs(8)
    out = {label: model(x, t, 16, y=torch.full((2,), label)) for label in range(4)}
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[3])
    torch.testing.assert_close(model(x, t, 16), out[3])  # y=None is the null label, index num_classes


def test_unconditional_model_ignores_labels():
    model = randomized(UNet(tiny_config(16, 2)))
    x, t = inputs(8)
    torch.testing.assert_close(model(x, t, 16, y=torch.tensor([0, 1])), model(x, t, 16))


def test_timestep_changes_the_output():
    model = randomized(UNet(tiny_config(16, 2)))
    x, _ = inputs(8)
    assert not torch.allclose(model(x, torch.tensor([0, 0]), 8), model(x, torch.tensor([900, 900]), 8))


def test_full_unet_shapes_and_resizing():
    model = randomized(UNet(tiny_config(16, 3, flexi=False)))
    for r, out_res in [(16, 16), (8, 8), (8, 16), (4, 8), (4, 4)]:
        x, t = inputs(r)
        assert model(x, t, out_res).shape == (2, 3, out_res, out_res)
    # A low-resolution input runs the full path on its nearest-neighbour upsampling.
    x, t = inputs(8)
    torch.testing.assert_close(model(x, t, 16), model(x.repeat_interleave(2, 2).repeat_interleave(2, 3), t, 16))


def test_bad_requests_are_refused_with_a_clear_message():
    model = UNet(tiny_config(16, 2))
    x, t = inputs(8)
    with pytest.raises(ValueError, match="serves"):
        model(*inputs(4), 4)
    with pytest.raises(ValueError, match="twice"):
        model(*inputs(8), 32)
    with pytest.raises(ValueError, match="twice"):
        model(*inputs(16), 32)
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :1], t, 8)
    with pytest.raises(ValueError, match="timestep per image"):
        model(x, t[:1], 8)
    with pytest.raises(ValueError, match="levels"):
        tiny_config(16, 4)
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(res=16, levels=1, base_channels=20, channel_mult=(1, 2))


# Hand count, 2 x multiply-adds as torch.utils.flop_counter counts them (bias adds, norms and softmax are free).
def conv(n, cin, cout, k=3):  # n x n output
    return 2 * n * n * cin * cout * k * k


def linear(cin, cout, rows=1):
    return 2 * rows * cin * cout


def res_block(n, cin, cout, emb=32):
    skip = conv(n, cin, cout, 1) if cin != cout else 0
    return conv(n, cin, cout) + conv(n, cout, cout) + skip + linear(emb, 2 * cout)


def attention(n, c):  # qkv, q k^T, attention x v, output projection over n*n tokens
    tokens = n * n
    return linear(c, 3 * c, tokens) + 2 * tokens * tokens * c + 2 * tokens * tokens * c + linear(c, c, tokens)


def test_gflops_equal_a_count_by_hand():
    # res 8, widths (8, 16), one block per level, attention at 4x4 (level 1 and the middle), grayscale.
    config = UNetConfig(res=8, levels=2, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        attn_res=(4,), num_heads=2, norm_groups=4)
    shared = linear(8, 32) + linear(32, 32)                          # timestep MLP
    middle = res_block(4, 16, 16) + attention(4, 16) + res_block(4, 16, 16)
    deep = res_block(4, 8, 16) + attention(4, 16)                     # level-1 encoder block
    deep_up = res_block(4, 16 + 16, 16) + attention(4, 16)            # decoder block on the level-1 skip
    upsample = res_block(4, 16 + 8, 16) + attention(4, 16) + conv(8, 16, 16)  # on the downsample skip
    top = res_block(8, 8, 8) + conv(4, 8, 8)                           # level-0 block and strided downsample
    top_up = res_block(8, 16 + 8, 8)                                   # decoder block on the level-0 skip
    hand = {  # widths of level 0 and of the downsample match, so those adapters are identities
        (8, 8): shared + conv(8, 1, 8) + top + deep + middle + deep_up + upsample + top_up + conv(8, 8, 1),
        (4, 4): shared + conv(4, 1, 8) + deep + middle + deep_up + conv(4, 16, 8, 1) + conv(4, 8, 1),
        (4, 8): shared + conv(4, 1, 8) + deep + middle + deep_up + upsample + top_up + conv(8, 8, 1),
    }
    model = UNet(config)
    for (r, out_res), flops in hand.items():
        assert path_gflops(model, r, out_res) == pytest.approx(flops / 1e9, rel=1e-12)
    full = UNet(replace(config, flexi=False))
    full_flops = hand[(8, 8)] - conv(8, 8, 1) + res_block(8, 8 + 8, 8) + conv(8, 8, 1)  # plus the stem-skip block
    assert path_gflops(full, 4, 4) == pytest.approx(full_flops / 1e9, rel=1e-12)


def test_average_gflops_follows_the_schedule():
    # METHOD.md §1, 3 levels: transitions at t = 555 and 889; t = 0 outputs the full resolution.
    model = UNet(tiny_config(16, 3))
    steps = {(16, 16): 555, (8, 16): 1, (8, 8): 333, (4, 8): 1, (4, 4): 110}
    expected = sum(n * path_gflops(model, *path) for path, n in steps.items()) / 1000
    assert average_gflops(model, ScaleSpace(16, 3)) == pytest.approx(expected, rel=1e-12)
    expected = sum(n * path_norm_values(model, *path) for path, n in steps.items()) / 1000
    assert average_norm_values(model, ScaleSpace(16, 3)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("path", [(16, 16), (8, 16), (4, 4)])
def test_groupnorm_values_are_what_the_network_normalises(path):
    """path_norm_values (hooks on a model of shapes only) against roofline's count of every native_group_norm's
    input on a real forward of two images."""
    import roofline
    model = UNet(tiny_config(16, 3))
    in_res, out_res = path
    with roofline.WorkCounter() as counter:
        model(torch.randn(2, 3, in_res, in_res), torch.tensor([900, 900]), out_res)
    assert counter.norm_values == 2 * path_norm_values(model, in_res, out_res) > 0


def test_paper_model_size_and_compute_at_64px():
    # The authors' model (paper Table 2): 92.26M parameters for the 4-level model; 56.71 GFLOPs for the full-resolution path (the 1L figure).
    with torch.device("meta"):
        model = UNet(paper_config(64, 4))
    assert parameter_count(model) / 1e6 == pytest.approx(92.26, abs=0.01)
    assert path_gflops(model, 64, 64) == pytest.approx(56.71, abs=0.01)


def test_upsample_is_nearest_neighbour():
    up = Upsample(4)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    reference = up.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    assert torch.equal(up(x), reference)
    grad = torch.randn_like(reference)
    mine, = torch.autograd.grad(up(x), x, grad)
    theirs, = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(mine, theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's fused GPU kernels need a CUDA GPU")
@pytest.mark.parametrize("in_res, out_res", [(16, 16), (8, 16)])
def test_inductor_blocks_match_the_eager_network_in_bf16(in_res, out_res):
    """The compiled blocks (GroupNorm, SiLU and the FiLM scale-shift fused by Inductor) give the eager network's
    output and gradients to bf16 accuracy, on random weights and inputs, with channels first and last."""
    for layout in (torch.contiguous_format, torch.channels_last):
        eager = randomized(UNet(tiny_config(16, 3, qk_norm=True))).cuda().to(memory_format=layout)
        compiled = copy.deepcopy(eager).compile_blocks()
        x, t = (v.cuda() for v in inputs(in_res, batch=8))
        x = x.contiguous(memory_format=layout)
        results = []
        for net in (eager, compiled):
            with torch.autocast("cuda", torch.bfloat16):
                out = net(x, t, out_res).float()
            out.square().mean().backward()
            results.append((out.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
        (out_e, grads_e), (out_c, grads_c) = results
        assert (out_c - out_e).abs().max() <= 2e-2 * out_e.abs().max()
        assert grads_c.keys() == grads_e.keys()
        for name, grad in grads_e.items():
            assert (grads_c[name] - grad).abs().max() <= 5e-2 * grad.abs().max() + 1e-6, name


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("offset", [1.0, 50.0])
@pytest.mark.parametrize("row_blocks, fused_grads", [(1, False), (3, False), (3, True)])
def test_the_compiled_groupnorm_is_torchs_and_keeps_the_layout(layout, backend, offset, row_blocks, fused_grads):
    """flexi_unet.GroupNorm compiled (from per-channel statistics, whole or over blocks of rows, its backward derived
    by autograd or written out) gives nn.GroupNorm's output and gradients, as computed in float64, also for values
    far from zero (where E[x^2] - E[x]^2 would cancel; torch's own CPU kernel for channels-last input loses digits
    there), and its output lies in its input's layout; eager it is nn.GroupNorm itself."""
    torch.manual_seed(0)
    reference = torch.nn.GroupNorm(4, 16).double()
    torch.nn.init.normal_(reference.weight), torch.nn.init.normal_(reference.bias)
    ours = GroupNorm(4, 16)
    ours.load_state_dict(reference.state_dict())
    ours.row_blocks, ours.fused_grads = row_blocks, fused_grads
    x = (3 * torch.randn(2, 16, 6, 5) + offset).contiguous(memory_format=layout)
    grad = torch.randn(2, 16, 6, 5)
    assert torch.equal(ours(x), torch.nn.functional.group_norm(x, 4, ours.weight, ours.bias))
    torch._dynamo.reset()  # compiled afresh: past Dynamo's recompile limit the forward would silently run eager
    compiled = torch.compile(ours, backend=backend, dynamic=False)
    results = []
    for net, dtype in ((reference, torch.float64), (compiled, torch.float32)):
        leaf = x.to(dtype).requires_grad_()
        out = net(leaf)
        out.backward(grad.to(dtype))
        results.append([t.double() for t in (out, leaf.grad, net.weight.grad, net.bias.grad)])
    for ours_value, exact in zip(results[1], results[0]):
        torch.testing.assert_close(ours_value, exact, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("per_channel", [True, False])
def test_traced_for_cuda_only_the_per_channel_groupnorm_keeps_channels_last(per_channel):
    """What Inductor compiles for a GPU, traced here on the CPU: fake CUDA tensors and Inductor's decompositions. The
    per-channel GroupNorm's output is channels-last like its input; torch's is channels-first (its decomposition
    reshapes the input to (batch, groups, channels per group, pixels) on every device but the CPU), the copies the
    per-channel form exists to avoid. Should torch's keep the layout one day, the False case fails: the switch would
    then be unneeded."""
    from unittest import mock
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode()
    on_cuda = lambda meta: FakeTensor(mode, meta, torch.device("cuda"))
    norm = GroupNorm(4, 16)
    norm.per_channel = per_channel
    x = on_cuda(torch.empty(2, 16, 5, 6, device="meta", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last))
    params = {name: on_cuda(torch.empty_like(p, device="meta")) for name, p in norm.named_parameters()}
    call = lambda params, x: torch.func.functional_call(norm, params, (x,))
    with mock.patch("torch.compiler.is_compiling", return_value=True), mode:
        graph = make_fx(call, decomposition_table=select_decomp_table())(params, x)
    (output,) = [node for node in graph.graph.nodes if node.op == "output"]
    (out,) = [node.meta["val"] for node in torch.utils._pytree.tree_leaves(output.args)]
    assert out.device.type == "cuda" and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == per_channel, out.stride()


@pytest.mark.parametrize("per_channel", [True, False])
def test_compile_blocks_chooses_the_groupnorm(per_channel):
    """compile_blocks(per_channel_norm=False) keeps torch's GroupNorm in the compiled blocks, True replaces it, and the
    two networks agree."""
    traced = []

    def backend(graph, example_inputs):  # records what Dynamo traced, then runs it as it is
        traced.extend(str(node.target) for node in graph.graph.nodes)
        return graph.forward

    eager = randomized(UNet(tiny_config(16, 2)))
    compiled = copy.deepcopy(eager).compile_blocks(per_channel_norm=per_channel, backend=backend)
    x, t = inputs(16, batch=2)
    torch.testing.assert_close(compiled(x, t, 16), eager(x, t, 16), atol=1e-5, rtol=1e-5)
    in_row_blocks = compiled.compile_blocks(per_channel_norm=per_channel, norm_row_blocks=4, backend=backend)
    torch.testing.assert_close(in_row_blocks(x, t, 16), eager(x, t, 16), atol=1e-5, rtol=1e-5)  # 16, 8, 4 px
    assert any("group_norm" in target for target in traced) != per_channel
    assert any("var_mean" in target for target in traced) == per_channel


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_a_joined_skip_hands_each_input_a_dense_gradient(layout, backend):
    """A decoder block's backward gives x and the skip gradients equal to torch.cat's, each dense in the skip's layout
    (torch.cat's are strided views), in eager and compiled alike."""
    block = randomized(Block(16 + 8, 16, 32, tiny_config(16, 2), attention=False)).to(memory_format=layout)
    if backend:
        block.compile(backend=backend, dynamic=False)
    leaves = [torch.randn(2, c, 4, 4).contiguous(memory_format=layout).requires_grad_() for c in (16, 8)]
    emb = torch.randn(2, 32)
    grads = {}
    x, skip = (leaf * 1 for leaf in leaves)  # not leaves: their hooks see the gradient as the backward hands it
    for name, tensor in (("x", x), ("skip", skip)):
        tensor.register_hook(lambda g, name=name: grads.setdefault(name, g))
    block(x, emb, skip).square().sum().backward()
    inputs = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    block.res(torch.cat(inputs, dim=1), emb).square().sum().backward()  # the block's own residual branch, eager
    for name, expected in zip(("x", "skip"), inputs):
        torch.testing.assert_close(grads[name], expected.grad, rtol=1e-5, atol=1e-5)  # compiled: fp32 rounding
        assert grads[name].is_contiguous(memory_format=layout), (name, grads[name].stride())
