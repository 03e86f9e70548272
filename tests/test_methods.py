"""methods.py: every method behind one interface; its paths and their shares follow the batch rule (METHOD.md §3)."""
import collections
import json

import pytest
import torch

import bench
import methods
import msf
import ssd
import train
from flexi_unet import tiny_config


def ssd_method(res, levels, transition_share=None, level_shares=None, transitions=None):
    scale_space = dict(res=res, levels=levels, T=1000, schedule="convex", gamma=0.5, op="bilinear", noise="linear",
                       transitions=transitions)
    return methods.from_spec(methods.ssd_spec("ssd", tiny_config(res, min(levels, 3)), scale_space,
                                              transition_share=transition_share, level_shares=level_shares))


@pytest.mark.parametrize("res,levels", [(64, 3), (32, 1), (64, 2)])
def test_path_shares_follow_the_batch_rule(res, levels):
    """One path per level and one per resolution change; the shares sum to one, each change gets 1/T."""
    method = ssd_method(res, levels)
    shares = {p.name: p.share for p in method.paths}
    assert sum(shares.values()) == pytest.approx(1.0) and len(shares) == 2 * levels - 1
    for t in method.ss.transitions:
        assert shares[method.path_name(t)] == pytest.approx(1 / 1000)
    if levels == 3:  # ConvexDecay 0.5 with 3 levels: level 0 holds steps 0..554
        assert shares[f"{res}->{res}"] == pytest.approx(555 / 1000)
    for path in method.paths:  # a path's representative step and its batches run that path
        assert method.path_name(method.path_steps(path, 4)) == path.name


def test_drawn_batches_take_each_path_with_its_share():
    method = ssd_method(32, 3, transition_share=0.1)
    shared, local = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    n = 20_000
    counts = collections.Counter(method.path_name(method.draw_steps(2, shared, local)) for _ in range(n))
    for path in method.paths:  # within 4 binomial standard errors
        assert abs(counts[path.name] / n - path.share) < 4 * (path.share * (1 - path.share) / n) ** 0.5, path.name


def test_level_shares_set_each_levels_batches_and_leave_the_transitions_theirs():
    method = ssd_method(32, 3, transition_share=0.1, level_shares=[3, 2, 1])
    assert method.spec["level_shares"] == pytest.approx([1 / 2, 1 / 3, 1 / 6])  # normalised in the spec
    shares = {p.name: p.share for p in method.paths}
    assert (shares["32->32"], shares["16->16"], shares["8->8"]) == pytest.approx((0.45, 0.3, 0.15))
    assert shares["16->32"] == shares["8->16"] == pytest.approx(0.05)
    shared, local = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    n = 20_000
    counts = collections.Counter()
    for _ in range(n):  # a level's images draw their steps uniformly among its resolution-preserving ones
        t = method.draw_steps(3, shared, local)
        counts[method.path_name(t)] += 1
        level = method.ss.level_of(int(t[0]))
        assert all(method.ss.level_of(int(s)) == level for s in t)
    for path in method.paths:  # within 4 binomial standard errors
        assert abs(counts[path.name] / n - path.share) < 4 * (path.share * (1 - path.share) / n) ** 0.5, path.name
    # Without the option the draws are the paper's rule: the steps the code drew before the option existed.
    plain, gens = ssd_method(32, 3), (torch.Generator().manual_seed(5), torch.Generator().manual_seed(6))
    assert [int(plain.draw_steps(4, *gens)[0]) for _ in range(12)] == [440, 806, 984, 505, 528, 652, 517, 230, 43,
                                                                       771, 412, 67]
    with pytest.raises(ValueError, match="--level_shares: a level has no resolution-preserving steps"):
        ssd_method(32, 3, level_shares=[1, 1, 1], transitions=[500, 501])


@pytest.mark.parametrize("name", ["ssd", "msf"])
def test_a_spec_is_plain_data_that_rebuilds_its_method(name):
    cfg = train.parse_config(["--res", "16", "--method", name, "--levels", "2" if name == "ssd" else "1"])
    spec = train.method_spec(cfg, 1, 0)
    assert json.loads(json.dumps(spec)) == json.loads(json.dumps(spec))  # strings, numbers, lists, dicts only
    method = methods.from_spec(spec)
    model = method.build_model()
    x0 = torch.rand(3, 1, 16, 16) * 2 - 1
    noise = lambda shape: torch.randn(shape)
    for path in method.paths:
        example = method.example(x0, method.path_steps(path, 3), noise)
        loss = method.loss(model, example)
        assert loss.shape == (3,) and torch.isfinite(loss).all()
    assert method.sample(model, 2, steps=4).shape == (2, 1, 16, 16)
    assert isinstance(method, msf.MSFMethod) == (name == "msf")


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'gan'"):
        methods.from_spec(dict(method="gan"))


def test_bench_variants_are_train_py_settings(tmp_path):
    args = type("Args", (), dict(res=64, levels=4, batch_size=None, compile=False))
    cfg = bench.variant_config(args, "ssd-nograph-paperattn", str(tmp_path))
    assert (cfg["levels"], cfg["cuda_graphs"], cfg["qk_norm"], cfg["batch_size"]) == (4, False, False, 128)
    assert bench.variant_config(args, "full", str(tmp_path))["method"] == "ddpm_x0"
    assert bench.variant_config(args, "ssd-nchw", str(tmp_path))["channels_last"] is False  # True on CUDA otherwise
    assert bench.variant_config(args, "ssd-catskip", str(tmp_path))["dense_skip_grads"] is False
    with pytest.raises(SystemExit, match="unknown variant 'ssd-fast'"):
        bench.variant_config(args, "ssd-fast", str(tmp_path))


def test_a_sampling_chain_costs_the_sum_of_its_steps():
    """All T steps cost T times the uniform average over the steps (flexi_unet.average_gflops); a respaced chain
    sums the paths it visits; MSF runs both stages for every step."""
    from flexi_unet import average_gflops
    ssd_method = methods.from_spec(train.method_spec(train.parse_config(["--res", "16"]), 1, 0))
    net = ssd_method.build_model()
    assert ssd_method.sampling_gflops(net) == pytest.approx(ssd_method.ss.T * average_gflops(net, ssd_method.ss))
    kept = ssd.sampling_steps(ssd_method.ss, 5)
    assert ssd_method.sampling_gflops(net, 5) == pytest.approx(
        sum(ssd_method.gflops(net, methods.Path(ssd_method.path_name(t), t, 0)) for t in kept))
    msf_method = methods.from_spec(train.method_spec(train.parse_config(["--res", "16", "--method", "msf"]), 1, 0))
    model = msf_method.build_model()
    assert msf_method.sampling_gflops(model, 5) == pytest.approx(5 * model.gflops())
