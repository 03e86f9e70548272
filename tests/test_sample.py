"""Tests for sample.py on tiny 16 px, 2-level checkpoints trained here for two steps (CPU, seconds)."""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

import fid
import sample
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 16  # bundled Fashion-MNIST at 16 px: 2 levels (16, 8)
CELL = RES + 2  # grids leave 2-px gaps
STEPS = "5"  # respaced sampling steps (2 levels need at least 3)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def train_tiny(folder, data_cache, *extra):
    # lr 1e-2 moves the zero-initialised output layers enough that images depend visibly on their noise
    train.main(["--out_dir", str(folder), "--res", str(RES), "--cache_dir", data_cache, "--max_steps", "2",
                "--batch_size", "4", "--lr", "1e-2", "--warmup", "0", "--sample_every", "0", "--sample_n", "2",
                "--sample_steps", "3", *extra])
    return str(folder / "ckpt.pt")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_cache):
    return train_tiny(tmp_path_factory.mktemp("uncond"), data_cache)


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory, data_cache):
    return train_tiny(tmp_path_factory.mktemp("cond"), data_cache, "--class_cond", "True")


def test_cli_without_checkpoint_says_how_to_train_one(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "ckpt.pt")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "python train.py" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_grid_has_one_cell_per_image(ckpt, tmp_path, capsys, sampler):
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", ckpt, "--n", "5", "--steps", STEPS, "--sampler", sampler, "--out", str(out)])
    with Image.open(out) as im:  # 5 images: 3 per row, 2 rows
        assert (im.format, im.mode, im.size) == ("PNG", "L", (3 * CELL + 2, 2 * CELL + 2))
    assert "images/s" in capsys.readouterr().out


def test_image_k_does_not_depend_on_the_batch(ckpt):
    method, model, _ = sample.load_model(ckpt)
    reference = sample.generate(method, model, 8, seed=3, steps=int(STEPS), batch_size=8)
    assert (reference[0] - reference[1]).abs().max() > 1e-2  # distinct noise gives distinct images
    for batch_size in (1, 3):
        x = sample.generate(method, model, 8, seed=3, steps=int(STEPS), batch_size=batch_size)
        torch.testing.assert_close(x, reference, atol=1e-5, rtol=0)  # batched convolutions round differently
    later = sample.generate(method, model, 3, seed=3, steps=int(STEPS), batch_size=2, first_index=5)
    torch.testing.assert_close(later, reference[5:], atol=1e-5, rtol=0)
    other_seed = sample.generate(method, model, 1, seed=4, steps=int(STEPS))
    assert (other_seed[0] - reference[0]).abs().max() > 1e-2


def test_outdir_writes_one_png_per_image_named_by_index(ckpt, tmp_path):
    out = tmp_path / "samples"
    sample.main(["--ckpt", ckpt, "--n", "5", "--batch_size", "2", "--steps", STEPS, "--outdir", str(out)])
    assert sorted(os.listdir(out)) == [f"{k:06d}.png" for k in range(5)]
    for name in os.listdir(out):
        with Image.open(out / name) as im:
            assert (im.format, im.size) == ("PNG", (RES, RES))
    method, model, _ = sample.load_model(ckpt)
    third = sample.generate(method, model, 1, steps=int(STEPS), first_index=3)
    with Image.open(out / "000003.png") as im:
        written = torch.tensor(list(im.tobytes()), dtype=torch.float32).view(1, 1, RES, RES) / 127.5 - 1
    torch.testing.assert_close(written, third, atol=1.01 / 127.5, rtol=0)  # uint8 rounding


def test_progression_strip_and_gif(ckpt, tmp_path):
    out = tmp_path / "progression.png"
    sample.main(["--ckpt", ckpt, "--progression", "--n", "2", "--steps", "20", "--frames", "8", "--out", str(out)])
    with Image.open(tmp_path / "progression.gif") as gif:
        frames = gif.n_frames
        assert gif.size == (2 * RES, 2 * RES)  # x_t | x_hat side by side, 2 images stacked
    assert frames >= 5
    with Image.open(out) as strip:  # a row of x_t and a row of x_hat per image, one column per frame
        assert strip.size == (frames * CELL + 2, 2 * 2 * CELL + 2)

    method, model, _ = sample.load_model(ckpt)
    shown = sample.save_progression(method, model, str(out), str(tmp_path / "p.gif"), n=1, steps=20, frames=8)
    ss = method.ss
    assert shown[0] == ss.T - 1 and shown[-1] == 0 and set(ss.transitions) <= set(shown)
    assert shown == sorted(shown, reverse=True)


def test_class_conditional_labels_and_guidance(cond_ckpt, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", cond_ckpt, "--n", "4", "--steps", STEPS, "--label", "1,2", "--cfg", "2", "--out", str(out)])
    assert os.path.isfile(out)
    with pytest.raises(ValueError, match="out of range.*10 classes"):
        sample.main(["--ckpt", cond_ckpt, "--label", "10", "--out", str(out)])
    with pytest.raises(ValueError, match="class number or a comma-separated list"):
        sample.main(["--ckpt", cond_ckpt, "--label", "cat", "--out", str(out)])

    method, model, _ = sample.load_model(cond_ckpt)
    make = lambda labels, scale=1.0: sample.generate(method, model, 2, steps=int(STEPS), labels=labels,
                                                     cfg_scale=scale)
    cycled, threes, sevens = make([3, 7]), make([3]), make([7])
    torch.testing.assert_close(cycled[0], threes[0])  # image k gets labels[k mod len(labels)]
    torch.testing.assert_close(cycled[1], sevens[1])
    assert not torch.allclose(threes, sevens)  # the label reaches the network
    assert not torch.allclose(make([3], 3.0), threes)  # and so does the guidance scale


def test_labels_on_an_unconditional_model_fail_clearly(ckpt, tmp_path):
    with pytest.raises(ValueError, match="class-conditional checkpoint.*--class_cond True"):
        sample.main(["--ckpt", ckpt, "--label", "1", "--out", str(tmp_path / "grid.png")])


def test_weights_that_do_not_fit_the_config_fail_clearly(ckpt, tmp_path):
    state = torch.load(ckpt, weights_only=True)
    state["ema"].pop(next(iter(state["ema"])))
    broken = tmp_path / "ckpt.pt"
    torch.save(state, broken)
    with pytest.raises(ValueError, match="do not fit the network its spec describes"):
        sample.load_model(str(broken))


def test_fid_is_printed_and_recorded(ckpt, tmp_path, capsys, monkeypatch):
    # A tiny random feature network stands in for Inception.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 13, stride=13), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())
    monkeypatch.setattr(fid, "load_inception", lambda path, device: fid.InceptionFeatures(net, "tiny", device))
    metrics = tmp_path / "metrics.json"
    sample.main(["--ckpt", ckpt, "--n", "6", "--steps", STEPS, "--outdir", str(tmp_path / "samples"), "--fid",
                 "--max_ref", "16", "--cache_dir", str(tmp_path / "cache"), "--metrics", str(metrics)])
    record = json.loads(metrics.read_text())
    assert math.isfinite(record["fid"]) and record["fid"] > 0
    assert (record["n"], record["n_ref"], record["steps"], record["sampler"]) == (6, 16, int(STEPS), "ancestral")
    assert record["images_per_s"] == pytest.approx(6 / record["seconds"])
    assert f"FID {record['fid']:.4f}" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# bad input: a one-line answer before any work


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n 0: must be at least 1"),
    (["--n", "0", "--outdir", "x"], "--n 0: must be at least 1"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--out", "no_such_folder/grid.png"], "the folder no_such_folder does not exist"),
    (["--fid"], "--fid scores the files that --outdir writes"),
])
def test_bad_flags_are_refused_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(argv)
    assert message in capsys.readouterr().err


def test_x0_uncertainty_changes_only_the_steps_it_names(ckpt, cond_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "X0_ERROR_IMAGES", 16)  # few training images: the test is of which steps change
    method, net, checkpoint = sample.load_model(ckpt)
    data = sample.training_data(types.SimpleNamespace(data_dir=None), checkpoint)
    errors = sample.measure_x0_error(method, net, data, int(STEPS), "transitions", 4)
    assert list(errors) == method.ss.transitions  # one resolution change, into 16 px
    assert errors[750].shape == (16, 1, RES, RES) and errors[750].abs().sum() > 0
    unchanged = {t: torch.zeros_like(s) for t, s in errors.items()}  # its own noise: the rest of the chain is kept
    for sampler in ("ancestral", "ddim"):
        plain = sample.generate(method, net, 3, steps=int(STEPS), sampler=sampler)
        assert not torch.equal(sample.generate(method, net, 3, steps=int(STEPS), sampler=sampler, x0_error=errors),
                               plain)
        assert torch.equal(sample.generate(method, net, 3, steps=int(STEPS), sampler=sampler, x0_error=unchanged),
                           plain)
    sample.main(["--ckpt", ckpt, "--n", "2", "--steps", STEPS, "--sampler", "ddim", "--x0_uncertainty", "all",
                 "--out", str(tmp_path / "grid.png")])
    assert "measured the network's error at 4 steps" in capsys.readouterr().out  # every kept step but the last
    with pytest.raises(ValueError, match="class-conditional"):
        sample.main(["--ckpt", cond_ckpt, "--steps", STEPS, "--x0_uncertainty", "transitions", "--out",
                     str(tmp_path / "cond.png")])


def test_more_steps_than_the_model_has_are_refused(ckpt, tmp_path):
    with pytest.raises(ValueError, match="--steps 5000: the model has T = 1000 steps"):
        sample.main(["--ckpt", ckpt, "--steps", "5000", "--out", str(tmp_path / "grid.png")])


def test_a_folder_or_a_corrupt_file_as_checkpoint_is_named(ckpt, tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder; pass the checkpoint file in it"):
        sample.main(["--ckpt", os.path.dirname(ckpt)])
    broken = tmp_path / "ckpt.pt"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a checkpoint written by torch.save"):
        sample.main(["--ckpt", str(broken)])


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_graphs_on_a_cpu_are_refused(ckpt, tmp_path):
    with pytest.raises(ValueError, match="--cuda_graphs True needs a CUDA device"):
        sample.main(["--ckpt", ckpt, "--cuda_graphs", "True", "--device", "cpu", "--out", str(tmp_path / "g.png")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("extra", [(), ("--class_cond", "True"), ("--method", "msf")])
def test_replayed_sampling_draws_the_same_images(tmp_path, data_cache, extra):
    """The recorded forwards give the images of the plain network, batch after batch (inputs copied in, outputs
    copied out), with and without guidance (two graphs per path) and for both MSF networks."""
    path = train_tiny(tmp_path, data_cache, *extra)
    cfg_scale = 2.0 if "--class_cond" in extra else 1.0
    images = []
    for graphs in (False, True):
        method, net, _ = sample.load_model(path, "cuda")
        classes = sample.class_labels(method, None, cfg_scale)
        y = None if classes is None else classes[torch.arange(3) % len(classes)].cuda()
        sample.speed_up(method, net, 3, y, cfg_scale, compile=False, graphs=graphs)
        images.append(sample.generate(method, net, 7, steps=4, batch_size=3, cfg_scale=cfg_scale))
    assert torch.allclose(images[0], images[1], atol=1e-5)


def test_recording_leaves_cpu_and_gradient_forwards_alone(ckpt):
    method, net, _ = sample.load_model(ckpt)
    x, t = torch.randn(2, 1, RES, RES), torch.full((2,), 10)
    expected = net(x, t, RES)
    net.record_graphs()
    with torch.no_grad():
        assert torch.equal(net(x, t, RES), expected)
    assert not net.graphs.graphs  # nothing was recorded on the CPU


def test_defaults_fit_a_cpu():
    """100 respaced steps unless told (the paper's 1000 only when asked)."""
    assert sample.parse_args([]).steps == 100 and sample.parse_args(["--steps", "1000"]).steps == 1000
