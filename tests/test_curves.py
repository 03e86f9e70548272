"""Snapshots at minutes of training or at steps (train.py --snapshot_minutes, --snapshot_steps) and their FID curves
(curves.py), on CPU."""
import json
import os
import time
import types

import pytest
import torch

import curves
import fid
import sample
import train

TINY = ["--res", "16", "--levels", "2", "--batch_size", "8", "--sample_every", "0", "--sample_n", "2",
        "--sample_steps", "3", "--log_every", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_snapshots_are_taken_at_their_minutes_and_a_resumed_run_continues_the_clock(tmp_path, cache_dir):
    argv = TINY + ["--out_dir", str(tmp_path), "--cache_dir", cache_dir, "--snapshot_minutes", "1e-9,2e-9,1000"]
    train.main(argv + ["--max_steps", "3"])
    names = sorted(os.listdir(tmp_path / "snapshots"))
    assert names == ["ema_1e-09min.pt", "ema_2e-09min.pt"]  # the first log line is past both; 1000 min never comes
    snap = torch.load(tmp_path / "snapshots" / names[0], weights_only=True)
    assert snap["step"] == 1 and snap["minutes"] == 1e-9 and snap["train_seconds"] > 6e-8
    assert snap["device"] == "1 x cpu"  # the hardware that counted the minutes
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    method, net, _ = sample.load_model(str(tmp_path / "snapshots" / names[0]))  # a snapshot is a checkpoint
    assert method.name == "ssd"
    resumed = train.main(argv + ["--max_steps", "5", "--resume", "True"])
    assert resumed.train_seconds > ckpt["train_seconds"] > 0  # the clock goes on from the checkpoint's


def test_step_snapshots_are_taken_at_their_exact_steps(tmp_path, cache_dir):
    argv = TINY + ["--out_dir", str(tmp_path), "--cache_dir", cache_dir, "--snapshot_steps", "2,3,9",
                   "--log_every", "5"]
    train.main(argv + ["--max_steps", "3"])
    assert sorted(os.listdir(tmp_path / "snapshots")) == ["ema_2steps.pt", "ema_3steps.pt"]  # step 2 has no log line
    snap = torch.load(tmp_path / "snapshots" / "ema_3steps.pt", weights_only=True)
    assert snap["step"] == 3 and snap["minutes"] is None and snap["images_seen"] == 3 * 8
    final = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(snap["ema"][k], v) for k, v in final["ema"].items())  # the EMA of step 3 itself


def test_a_step_snapshot_past_the_time_budget_still_ends_on_a_logged_checkpoint(tmp_path, cache_dir):
    """A snapshot between log lines reads the clock, past the budget here; the run still stops at its next log
    line, with the log and the checkpoint of that step."""
    train.main(TINY + ["--out_dir", str(tmp_path), "--cache_dir", cache_dir, "--snapshot_steps", "2", "--log_every",
                       "5", "--time_budget", "1e-9", "--max_steps", "100"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 5
    assert os.listdir(tmp_path / "snapshots") == ["ema_2steps.pt"]


def test_checkpoints_snapshots_and_sample_grids_pause_the_clock(tmp_path, cache_dir, monkeypatch):
    """Each of them takes a second here, and the three steps' training time stays under one."""
    for name in ("save", "save_snapshot", "save_samples"):
        slow = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *args, slow=slow: (time.sleep(1), slow(*args))[1])
    run = train.main(TINY + ["--out_dir", str(tmp_path), "--cache_dir", cache_dir, "--ckpt_every", "1",
                             "--snapshot_steps", "1,2", "--sample_every", "1", "--max_steps", "3"])
    assert run.step == 3 and run.train_seconds < 1


def test_bad_snapshot_minutes_are_named():
    with pytest.raises(ValueError, match="--snapshot_minutes 'one': give minutes"):
        train.parse_config(["--snapshot_minutes", "one"])
    with pytest.raises(ValueError, match="--snapshot_minutes: every entry must be positive"):
        train.parse_config(["--snapshot_minutes", "0,1"])
    with pytest.raises(ValueError, match="--snapshot_steps '1.5': give steps"):
        train.parse_config(["--snapshot_steps", "1.5"])
    with pytest.raises(ValueError, match="--snapshot_steps: every entry must be positive"):
        train.parse_config(["--snapshot_steps", "0,1"])


def test_curves_score_every_snapshot_once_and_draw_the_table(tmp_path, cache_dir, monkeypatch, capsys):
    runs = []
    for name, method, when in (("ssd", "ssd", ["--snapshot_minutes", "1e-9,2e-9"]),
                               ("ddpm", "ddpm_x0", ["--snapshot_steps", "1,2"])):
        out = tmp_path / name
        levels = "2" if method == "ssd" else "1"
        train.main(TINY + ["--out_dir", str(out), "--cache_dir", cache_dir, "--method", method, "--levels", levels,
                           "--max_steps", "2", *when])
        runs.append(str(out))
    torch.manual_seed(0)  # a tiny random feature network stands in for Inception
    monkeypatch.setattr(sample, "X0_ERROR_IMAGES", 16)  # and the network's error on few training images
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 13, stride=13), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    monkeypatch.setattr(fid, "load_inception", lambda path, device: fid.InceptionFeatures(net, "tiny", device))
    argv = [*runs, "--n", "6", "--steps", "4", "--batch_size", "4", "--max_ref", "16", "--cache_dir",
            str(tmp_path / "fid_cache"), "--out", str(tmp_path / "curves"), "--device", "cpu"]
    built, load_model = [], sample.load_model
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: built.append(a[0]) or load_model(*a, **k))
    curves.main(argv)
    assert len(built) == 2  # one network per run: its later snapshots' weights are copied into it
    rows = json.loads((tmp_path / "curves" / "curves.json").read_text())["runs"]
    assert [(r["run"], r["minutes"], r["step"]) for r in rows] == [("ssd", 1e-9, 1), ("ssd", 2e-9, 1),
                                                                   ("ddpm", None, 1), ("ddpm", None, 2)]
    assert all(r["fid"] > 0 and r["n"] == 6 and r["n_ref"] == 16 for r in rows)
    assert {r["method"] for r in rows} == {"ssd", "ddpm_x0"}
    text = (tmp_path / "curves" / "curves.md").read_text()
    assert (tmp_path / "curves" / "curves.png").is_file() and "| ssd | ssd | 1 x cpu | 1e-09 min |" in text
    assert "| ddpm | ddpm_x0 | 1 x cpu | step 2 | 1 |" in text
    floors = json.loads((tmp_path / "curves" / "curves.json").read_text())["floors"]
    assert len(floors) == 1 and floors[0]["n"] == 6 and floors[0]["n_ref"] == 16  # one dataset: one floor
    assert f"Floor: 6 training images of {floors[0]['dataset']} at 16 px score {floors[0]['fid']:.2f}" in text
    assert 0 <= floors[0]["fid"] < min(r["fid"] for r in rows)  # real images score below the tiny untrained models

    curves.main([*argv, "--x0_uncertainty", "transitions", "--out", str(tmp_path / "x0")])
    drawn = json.loads((tmp_path / "x0" / "curves.json").read_text())["runs"]
    assert all(os.path.exists(r["snapshot"][:-len(".pt")] + ".x0_transitions.json") for r in drawn)  # kept apart
    assert all(r["x0_uncertainty"] == "transitions" and r["x0_error_seconds"] >= 0 for r in drawn)
    assert "| ssd +x0 transitions | ssd |" in (tmp_path / "x0" / "curves.md").read_text()
    curves.main([*argv, "--sampler", "ddim", "--x0_uncertainty", "transitions", "--out", str(tmp_path / "ddim")])
    ddim = json.loads((tmp_path / "ddim" / "curves.json").read_text())["runs"]
    assert all(os.path.exists(r["snapshot"][:-len(".pt")] + ".ddim.x0_transitions.json") for r in ddim)
    assert all(r["sampler"] == "ddim" for r in ddim)
    assert "| ssd ddim +x0 transitions | ssd |" in (tmp_path / "ddim" / "curves.md").read_text()

    first, second = (str(tmp_path / "ddpm" / "snapshots" / f"ema_{k}steps.pt") for k in (1, 2))
    args = types.SimpleNamespace(batch_size=4, n=6, compile=None, cuda_graphs=None)
    method, net, ckpt = curves.with_weights(first, torch.device("cpu"), args)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    storage = [p.data_ptr() for p in net.parameters()]
    same_method, same_net, ckpt = curves.with_weights(second, torch.device("cpu"), args, (method, net))
    assert same_method is method and same_net is net and ckpt["step"] == 2
    assert [p.data_ptr() for p in net.parameters()] == storage  # copied in place: recorded graphs read them there
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in net.state_dict().items())  # the second snapshot's weights
    assert not all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # which differ from the first's

    scored = []
    monkeypatch.setattr(curves, "score", lambda *args: scored.append(args) or {})
    curves.main(argv)  # every snapshot already has its score beside it: nothing is sampled again
    assert scored == []

    for weights in (tmp_path / "ssd" / "snapshots").glob("*.pt"):
        weights.unlink()  # a scored point stays on the curve without its (large) weights
    monkeypatch.setattr(fid, "load_inception", None)  # redrawn from the kept scores: no feature network needed
    curves.main(argv)
    assert scored == [] and json.loads((tmp_path / "curves" / "curves.json").read_text())["runs"] == rows
    with pytest.raises(FileNotFoundError, match="scored with --n 6 --steps 4 --max_ref 16 and its weights"):
        curves.main([*argv, "--steps", "8"])  # other sampling steps cannot rescore it
    with pytest.raises(FileNotFoundError, match="are gone and no score was kept at .*x0_all.json"):
        curves.main([*argv, "--x0_uncertainty", "all"])
    for plain in (tmp_path / "ssd" / "snapshots").glob("ema_*min*.json"):
        if ".ddim." not in plain.name:
            plain.unlink()  # a point scored only with DDIM and the uncertainty is still found, from that score alone
    curves.main([*argv, "--sampler", "ddim", "--x0_uncertainty", "transitions", "--out", str(tmp_path / "ddim")])
    assert json.loads((tmp_path / "ddim" / "curves.json").read_text())["runs"] == ddim


def test_seeds_of_a_setting_are_summarised_by_their_mean_and_range():
    rows = [dict(run=run, method=method, minutes=m, fid=fid, images_seen=seen)
            for run, method, m, fid, seen in (("ssd4_s0", "ssd", 1, 60.0, 100), ("ssd4_s1", "ssd", 1, 64.0, 110),
                                              ("ssd4_s0", "ssd", 2, 40.0, 200), ("ddpm_s0", "ddpm_x0", 1, 50.0, 60))]
    settings = curves.summary(rows)
    assert [(r["setting"], r["minutes"], r["seeds"]) for r in settings] == [("ssd4", 1, 2), ("ssd4", 2, 1),
                                                                             ("ddpm", 1, 1)]
    first = settings[0]
    assert (first["fid"], first["fid_min"], first["fid_max"], first["images_seen"]) == (62.0, 60.0, 64.0, 105)
    assert "| ssd4 | ssd | not recorded | 1 min | 2 | 105 | 62.00 | 60.00 - 64.00 |" in curves.summary_table(settings)
    assert curves.setting_of(dict(run="my_run")) == "my_run" and curves.setting_of(dict(run="lr_s2_s10")) == "lr_s2"
    assert curves.setting_of(dict(run="ssd4_s1", x0_uncertainty="transitions")) == "ssd4 +x0 transitions"
    assert curves.setting_of(dict(run="ssd4_s1", sampler="ddim", x0_uncertainty="none")) == "ssd4 ddim"


def test_versus_gives_each_settings_fid_difference_and_speed_ratio_at_the_references_points():
    H100, H200 = "1 x NVIDIA H100 80GB HBM3", "1 x NVIDIA H200"
    rows = [dict(run=run, method="ssd" if run.startswith("ssd") else "ddpm_x0", minutes=m, fid=fid, images_seen=seen,
                 train_seconds=60 * m, device=device, step=seen // 128)
            for run, m, fid, seen, device in (
                ("ssd4_s0", 4, 40.0, 480000, H100), ("ssd4_s1", 4, 44.0, 528000, H100),  # 2,000 and 2,200 img/s
                ("ssd4_s0", 8, 30.0, 960000, H100), ("ddpm_s0", 4, 31.0, 312000, H100),  # 1,300 img/s
                ("ssd4_s2", 4, 20.0, 600000, H200))]  # no DDPM point on an H200: not compared
    rows.append(dict(rows[3], run="msf_s0", method="msf", train_seconds=None))  # time not recorded
    against = curves.versus(curves.summary(rows), "ddpm")
    assert [(r["setting"], r["point"], r["device"]) for r in against] == [("ssd4", "4 min", H100),
                                                                         ("msf", "4 min", H100)]
    ssd = against[0]
    assert (ssd["seeds"], ssd["fid"], ssd["reference_fid"]) == (2, 42.0, 31.0)
    assert ssd["difference"] == pytest.approx(11.0) and ssd["speed"] == pytest.approx(2100 / 1300)
    assert against[1]["difference"] == 0 and against[1]["speed"] is None
    table = curves.versus_table(against)
    assert "| ssd4 | 1 x NVIDIA H100 80GB HBM3 | 4 min | 2 | 42.00 | 1 | 31.00 | +11.00 | 1.62x |" in table
    assert "| msf | 1 x NVIDIA H100 80GB HBM3 | 4 min | 1 | 31.00 | 1 | 31.00 | +0.00 | - |" in table


def test_versus_an_unknown_setting_is_named_before_any_scoring(tmp_path, capsys):
    for run in ("ssd4_s0", "ddpm_s0"):
        (tmp_path / run / "snapshots").mkdir(parents=True)
    with pytest.raises(SystemExit):
        curves.main([str(tmp_path / "ssd4_s0"), str(tmp_path / "ddpm_s0"), "--versus", "dpm"])
    assert "--versus dpm: no such setting among these runs (ssd4, ddpm)" in capsys.readouterr().err


def test_seeds_trained_on_different_hardware_are_summarised_apart(tmp_path, monkeypatch):
    """A minute of an H100 is not a minute of an H200: their snapshots never share a mean, and the plot names both."""
    rows = [dict(run=run, method="ssd", minutes=4, fid=fid, images_seen=seen, device=device, step=seen // 128)
            for run, fid, seen, device in (("ssd4_s0", 37.5, 556800, "1 x NVIDIA H200"),
                                           ("ssd4_s1", 34.4, 505600, "1 x NVIDIA H100 80GB HBM3"),
                                           ("ssd4_s2", 35.0, 556000, "1 x NVIDIA H200"))]
    settings = curves.summary(rows)
    assert [(r["device"], r["seeds"], r["fid"]) for r in settings] == [("1 x NVIDIA H200", 2, 36.25),
                                                                      ("1 x NVIDIA H100 80GB HBM3", 1, 34.4)]
    assert "| ssd4 | ssd | 1 x NVIDIA H100 80GB HBM3 | 4 min | 1 |" in curves.summary_table(settings)
    labels, real = [], curves.plt.Axes.plot
    monkeypatch.setattr(curves.plt.Axes, "plot",
                        lambda self, *a, **k: labels.append(k.get("label")) or real(self, *a, **k))
    curves.plot(settings, [dict(r, n=2000, steps=100) for r in rows], str(tmp_path / "curves.png"))
    assert "ssd4 (ssd, 2 seeds, 1 x H200)" in labels and "ssd4 (ssd, 1 seed, 1 x H100 80GB HBM3)" in labels


def test_a_run_without_snapshots_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no snapshots.*--snapshot_minutes or --snapshot_steps"):
        curves.main([str(tmp_path)])
