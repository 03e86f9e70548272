"""official.py: the authors' checkpoints in our UNet, checked against what their code computes.

Without their code: tests/data/official_tiny.pt (made by tests/make_official_fixture.py with their code) holds a tiny
model of theirs and its outputs on every resolution path and at their sampler's steps; a few seconds on a CPU.
With SSD_OFFICIAL_REPO set to a folder with their source: every released configuration at full size, random
weights, against their model and sampler (about 5 minutes on one CPU core; -s prints the measured differences).
"""
import argparse
import dataclasses
import functools
import os

import pytest
import torch

import methods
import official
from degrade import ScaleSpace
from flexi_unet import UNet
from make_official_fixture import FIXTURE, TINY, paths, tiny_unet_config

TOLERANCE = 1e-5  # max |ours - theirs| / max |theirs|: float32 rounding, summed in another order


@functools.lru_cache(maxsize=None)
def fixture():
    """The fixture, loaded once (read only: their_weights and unconditional make new dicts)."""
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def their_weights(fx):
    """Their state dict in float32, as in their files (the fixture stores float16 values)."""
    return {k: v.float() for k, v in fx["state_dict"].items()}


def unconditional(sd):
    return {k: v for k, v in sd.items() if k != "label_emb.weight"}


def our_model(sd, config):
    model = UNet(config)
    model.load_state_dict(official.convert_state_dict(sd, config))
    return model.eval()


def their_routing(config):
    """A config routed as their sampler routes the step into full resolution."""
    return dataclasses.replace(config, upsample_into_full=True)


def checkpoint_model(ckpt):
    """The network of a converted checkpoint, its EMA weights loaded, as sample.py builds it."""
    model = methods.from_spec(ckpt["spec"]).build_model()
    model.load_state_dict(ckpt["ema"])
    return model.eval()


def difference(ours, theirs):
    """(max abs difference, the same relative to the largest value of theirs)."""
    err = float((ours - theirs).abs().max())
    return err, err / float(theirs.abs().max())


def assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, what
    err, rel = difference(ours, theirs)
    assert rel < TOLERANCE, f"{what}: max abs difference {err:.3g} ({rel:.3g} of the largest output)"
    return err, rel


# -----------------------------------------------------------------------------
# The tiny model of theirs (tests/data/official_tiny.pt)


def test_every_resolution_path_matches_their_model():
    fx = fixture()
    sd = their_weights(fx)
    uncond = our_model(unconditional(sd), tiny_unet_config())
    cond = our_model(sd, tiny_unet_config(TINY["num_classes"]))
    assert set(fx["paths"]) == {f"{r}->{o}" for r, o in paths(TINY["image_size"], TINY["levels"])}
    with torch.no_grad():
        for name, case in fx["paths"].items():
            out_res = int(name.split("->")[1])
            assert_close(uncond(case["x"], case["t"], out_res), case["out"], name)
            assert_close(cond(case["x"], case["t"], out_res, fx["y"]), case["out_cond"], f"{name}, class-conditional")


def test_their_sampler_steps_match_ours():
    """Their p_mean_variance at every resolution change and inside every level: the prediction (with their
    routing of the step into full resolution) and the posterior mean of the same x_t and prediction."""
    fx = fixture()
    net = our_model(unconditional(their_weights(fx)), their_routing(tiny_unet_config()))
    ss = ScaleSpace(TINY["image_size"], TINY["levels"])
    assert [ss.res(t) for t in range(ss.T)] == fx["resolution"].tolist()  # their level schedule is ours
    assert {int(t) for t in fx["sampler"]} >= set(ss.transitions)
    with torch.no_grad():
        for key, step in fx["sampler"].items():
            t, x_t = int(key), step["x_t"]
            pred = net(x_t, torch.full((x_t.shape[0],), t), ss.sizes[ss.target_level(t)])
            assert_close(pred, step["pred"], f"prediction at t = {t}")
            assert_close(ss.posterior_mean(x_t, step["pred"], t), step["mean"], f"posterior mean at t = {t}")


def test_the_zero_skip_route_into_full_resolution_is_not_their_sampler_s():
    """At t = transitions[0] their sampler upsamples x_t and runs the full-resolution path (upsample_into_full);
    the zero-skip route, which their model also has, gives something else."""
    fx = fixture()
    sd = unconditional(their_weights(fx))
    ss = ScaleSpace(TINY["image_size"], TINY["levels"])
    t = ss.transitions[0]
    step = fx["sampler"][str(t)]
    with torch.no_grad():
        plain = our_model(sd, tiny_unet_config())(step["x_t"], torch.full((2,), t), TINY["image_size"])
    assert difference(plain, step["pred"])[1] > 1e-2


def test_shared_adapters_take_the_copy_their_loader_keeps():
    config = tiny_unet_config()
    sources = official.adapter_sources(config)
    # 16 px, widths 8, 16, 16, 16: one in-conv for 4 and 2 px, one out-conv for 8, 4 and 2 px
    assert sources == {"adapters_in.4": "adapters_in.2", "adapters_in.2": "adapters_in.2",
                       "adapters_out.2": "adapters_out.8", "adapters_out.4": "adapters_out.8",
                       "adapters_out.8": "adapters_out.8"}
    sd = unconditional(their_weights(fixture()))
    assert len(official.shared_copies_that_differ(sd, config)) == 3
    converted = official.convert_state_dict(sd, config)
    assert torch.equal(converted["in_adapters.2.weight"], sd["adapters_in.2.weight"])
    assert torch.equal(converted["out_adapters.2.weight"], sd["adapters_out.8.weight"])


def test_released_names_and_configs():
    assert len(official.RELEASED) == 7
    for m in official.RELEASED:
        name = official.file_name(**m)
        assert official.parse_name(os.path.join("downloads", name)) == m
        assert official.is_released(m["dataset"], m["res"], m["levels"])
        config = official.unet_config(m["res"], m["levels"])
        assert (config.res, config.levels, config.base_channels, config.num_res_blocks, config.num_heads,
                config.norm_groups, config.attn_res) == (m["res"], m["levels"], 128, 2, 4, 32, (16, 8))
    assert official.file_name("celeba", 64, 4, 1_000_000) == "ssd_64res_celeba_4levels_ema_0.9999_1000000.pt"
    assert official.parse_name("ema_0.9999_1000000.pt") is None


def test_is_official():
    fx = fixture()
    sd = their_weights(fx)
    assert official.is_official(sd) and official.is_official({"model": sd, "step": 5})
    ours = official.convert_state_dict(unconditional(sd), tiny_unet_config())
    assert not official.is_official(ours)
    assert not official.is_official({"format": 1, "ema": ours})
    assert not official.is_official([1, 2])


# -----------------------------------------------------------------------------
# Refusals


def test_a_wrong_shape_names_the_expected_one():
    sd = unconditional(their_weights(fixture()))
    sd["output_blocks.3.0.in_layers.2.weight"] = torch.zeros(16, 31, 3, 3)
    with pytest.raises(ValueError, match=r"output_blocks\.3\.0\.in_layers\.2\.weight: shape \(16, 31, 3, 3\), "
                                         r"expected \(16, 32, 3, 3\)"):
        official.convert_state_dict(sd, tiny_unet_config())
    del sd["output_blocks.3.0.in_layers.2.weight"]
    with pytest.raises(ValueError, match=r"output_blocks\.3\.0\.in_layers\.2\.weight: missing, expected shape "
                                         r"\(16, 32, 3, 3\)"):
        official.convert_state_dict(sd, tiny_unet_config())


def test_a_file_that_fits_no_released_configuration_says_what_was_expected(tmp_path):
    path = tmp_path / official.file_name("celeba", 64, 4, 1000)
    torch.save({"model": unconditional(their_weights(fixture())), "step": 1000}, path)
    with pytest.raises(ValueError, match=r"does not fit the 64 px Flexi-UNet.*time_embed\.0\.weight: shape "
                                         r"\(32, 8\), expected \(512, 128\)"):
        official.load_official(str(path))


def test_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / official.file_name("celeba", 64, 4, 1000)
    torch.save({"model": {"input_blocks.0.0.weight": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="pickled objects other than tensors"):
        official.load_official(str(path))
    torch.save(["not", "a", "state dict"], path)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        official.load_official(str(path))
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint written by torch.save"):
        official.load_official(str(path))


def test_an_unknown_file_name_needs_flags(tmp_path):
    path = tmp_path / "ema_0.9999_300000.pt"
    torch.save({"model": unconditional(their_weights(fixture())), "step": 300000}, path)
    with pytest.raises(ValueError, match="cannot tell the model from the file name.*--res 64 --levels 4"):
        official.load_official(str(path))
    with pytest.raises(ValueError, match="does not fit the 128 px Flexi-UNet"):  # flags given: their shapes checked
        official.load_official(str(path), res=128, levels=3)


# -----------------------------------------------------------------------------
# The command and the checkpoint it writes


def test_the_command_writes_a_checkpoint_that_reproduces_their_model(tmp_path, monkeypatch, capsys):
    fx = fixture()
    src = tmp_path / "their_tiny_ema.pt"
    torch.save({"model": unconditional(their_weights(fx)), "step": 1234}, src)
    # The tiny model is no released configuration: stand its config in for the paper's.
    monkeypatch.setattr(official, "unet_config", lambda res, levels, num_classes=0: their_routing(tiny_unet_config()))
    dst = tmp_path / "converted.pt"
    official.main([str(src), str(dst), "--res", "16", "--levels", "4", "--dataset", "celeba"])
    assert "16 px, 4 levels" in capsys.readouterr().out
    assert not os.path.exists(str(dst) + ".tmp")

    ckpt = torch.load(dst, weights_only=True)
    spec = ckpt["spec"]
    assert (ckpt["format"], spec["method"], ckpt["step"], ckpt["source"]) == (1, "ssd", 1234, "their_tiny_ema.pt")
    assert spec["scale_space"] == dict(res=16, levels=4, T=1000, schedule="convex", gamma=0.5, op="bilinear",
                                       noise="linear", transitions=None)
    assert spec["unet"]["upsample_into_full"] and not spec["unet"]["qk_norm"]
    net = checkpoint_model(ckpt)
    case = fx["paths"]["4->4"]
    with torch.no_grad():
        assert_close(net(case["x"], case["t"], 4), case["out"], "converted checkpoint, 4->4")


def test_sample_py_draws_from_their_file_directly(tmp_path, monkeypatch):
    """sample.py recognises their layout, converts it on the fly and samples; the network is theirs on every path."""
    import sample
    fx = fixture()
    src = tmp_path / official.file_name("celeba", 16, 4, 1000)  # a released-style name: res and levels from it
    torch.save({"model": unconditional(their_weights(fx)), "step": 1000}, src)
    monkeypatch.setattr(official, "unet_config", lambda res, levels, num_classes=0: their_routing(tiny_unet_config()))
    method, net, ckpt = sample.load_model(str(src))
    assert ckpt["step"] == 1000 and method.ss.transitions == ScaleSpace(16, 4).transitions
    with torch.no_grad():
        for name, case in fx["paths"].items():
            out_res = int(name.split("->")[1])
            if not (out_res == 16 and case["x"].shape[-1] == 8):  # their route into full resolution: tested above
                assert_close(net(case["x"], case["t"], out_res), case["out"], name)
    grid = tmp_path / "grid.png"
    sample.main(["--ckpt", str(src), "--n", "4", "--steps", "8", "--out", str(grid), "--device", "cpu"])
    assert grid.is_file()


# -----------------------------------------------------------------------------
# Every released configuration, against their code (SSD_OFFICIAL_REPO)

needs_their_code = pytest.mark.skipif(not os.environ.get("SSD_OFFICIAL_REPO"),
                                      reason="set SSD_OFFICIAL_REPO to a folder with the authors' source")
CASES = [(m["dataset"], m["res"], m["levels"], False) for m in official.RELEASED] + [("imagenet", 64, 2, True)]


@pytest.fixture(scope="module")
def their_code():
    from make_official_fixture import import_official
    return import_official()


def their_released_model(their, res, levels, class_cond):
    """Their model as scripts/image_sample.py builds it: configs/model.yaml and ssd.yaml, the resolution given."""
    import yaml
    with open(os.path.join(os.environ["SSD_OFFICIAL_REPO"], "configs", "model.yaml")) as f:
        model_cfg = yaml.safe_load(f)
    model_cfg.update(image_size=res, class_cond=class_cond)
    from make_official_fixture import their_diffusion
    diffusion, layer_map = their_diffusion(their, res, levels, their.script_util.DEFAULT_CHANNEL_MULTS[res].split(","))
    model = their.script_util.create_model(**model_cfg, ssd_config={"multires_training_mode": "flexi_unet"},
                                           unet_res_layer_map=layer_map)
    return model.eval(), diffusion


@needs_their_code
@pytest.mark.parametrize("dataset,res,levels,class_cond", CASES)
def test_released_configuration_matches_their_code(their_code, dataset, res, levels, class_cond):
    from make_official_fixture import randomize, their_forward, their_sampler_step, with_distinct_shared_copies
    torch.manual_seed(0)
    theirs, diffusion = their_released_model(their_code, res, levels, class_cond)
    randomize(theirs, seed=CASES.index((dataset, res, levels, class_cond)))
    sd = with_distinct_shared_copies(theirs, seed=1)
    steps = 1_000_000 if res == 64 else 300_000
    ckpt = official.official_checkpoint({"model": sd, "step": steps}, official.file_name(dataset, res, levels, steps))
    assert ckpt["spec"]["unet"]["num_classes"] == (1000 if class_cond else 0)
    net = checkpoint_model(ckpt)
    plain = UNet(dataclasses.replace(net.config, upsample_into_full=False))  # the route their model takes given
    plain.load_state_dict(net.state_dict())                                 # cond_rs
    ss = ScaleSpace(**ckpt["spec"]["scale_space"])
    assert [ss.res(t) for t in range(ss.T)] == [diffusion.get_resolution(t) for t in range(ss.T)]

    g = torch.Generator().manual_seed(3)
    y = torch.tensor([7]) if class_cond else None
    report = []
    with torch.no_grad():
        for r, out_res in paths(res, levels):
            x, t = torch.randn(1, 3, r, r, generator=g), torch.randint(0, 1000, (1,), generator=g)
            ours = plain(x, t, out_res, y)
            report.append((f"{r}->{out_res}", *assert_close(ours, their_forward(theirs, x, t, out_res, y),
                                                            f"{r}->{out_res}")))
        if levels > 1 and not class_cond:  # their sampler's own routing at the step into full resolution
            t = ss.transitions[0]
            x_t = torch.randn(1, 3, res // 2, res // 2, generator=g)
            pred, mean = their_sampler_step(diffusion, theirs, x_t, t)
            report.append((f"sampler t={t}", *assert_close(net(x_t, torch.full((1,), t), res), pred,
                                                           f"their sampler's prediction at t = {t}")))
            report.append((f"sampler mean t={t}", *assert_close(ss.posterior_mean(x_t, pred, t), mean,
                                                                f"their sampler's mean at t = {t}")))
        for t in sorted({ss.T - 1, *ss.transitions}):  # the posterior mean, any x_t and x_hat
            x_t = torch.randn(1, 3, ss.res(t), ss.res(t), generator=g)
            x_hat = torch.rand(1, 3, ss.res(t - 1), ss.res(t - 1), generator=g) * 2 - 1
            mean, _ = diffusion.q_posterior_mean_variance(x_start=x_hat, x_t=x_t, t=torch.full((1,), t))
            report.append((f"mean t={t}", *assert_close(ss.posterior_mean(x_t, x_hat, t), mean, f"mean at t = {t}")))
    print(f"\n{dataset} {res} px {levels}L{' class-conditional' if class_cond else ''}: "
          + ", ".join(f"{name} {err:.2e} ({rel:.1e})" for name, err, rel in report))
