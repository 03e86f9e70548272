"""
Tests of train.py on the tiny config (16 px, 2 levels, batch 8, CPU): outputs, learning, exact resume, DDP over two
gloo processes, the command line, and the message of every bad input.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train
from data import ImageData
from ssd import training_example, weighted_mse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--res", "16", "--levels", "2", "--batch_size", "8", "--sample_n", "4", "--sample_steps", "5"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Steps of a tiny model are short: on a shared machine, OpenMP threads waiting on each other make them up to
    # ten times slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # The bundled Fashion-MNIST is prepared once for the whole file, outside the repository.
    return str(tmp_path_factory.mktemp("cache"))


def tiny_config(out_dir, cache_dir, *args):
    return train.parse_config(TINY + ["--out_dir", str(out_dir), "--cache_dir", cache_dir, *args])


def fit(out_dir, cache_dir, *args):
    """Train the tiny config and return its checkpoint, read as a resumed run reads it."""
    train.Trainer(tiny_config(out_dir, cache_dir, *args)).fit()
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def reject(constant):
    raise ValueError(f"log.jsonl holds {constant}, which is not standard JSON")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line, parse_constant=reject) for line in f]


def assert_same(a, b, where="checkpoint"):
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# -----------------------------------------------------------------------------
# a run and what it writes


def test_optional_wandb_logging(tmp_path, cache_dir, monkeypatch):
    """--wandb_project hands every log record to wandb (a stand-in module here); off by default."""
    logged = []
    fake = type(sys)("wandb")
    fake.init = lambda **kwargs: logged.append(("init", kwargs["project"]))
    fake.log = lambda record, step: logged.append((step, record["loss"]))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    fit(tmp_path, cache_dir, "--max_steps", "2", "--log_every", "1", "--wandb_project", "ssd-test")
    assert logged[0] == ("init", "ssd-test") and [step for step, _ in logged[1:]] == [1, 2]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a clear message, not an ImportError
    with pytest.raises(SystemExit, match="pip install wandb"):
        fit(tmp_path / "b", cache_dir, "--max_steps", "1", "--wandb_project", "ssd-test")


def test_help():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--max_steps" in result.stdout and "--resume" in result.stdout


def test_tiny_run_writes_checkpoint_log_and_samples(tmp_path, cache_dir):
    ckpt = fit(tmp_path, cache_dir, "--max_steps", "3", "--log_every", "2", "--ckpt_every", "2")

    assert {"model", "ema", "optimizer", "step", "images_seen", "config", "rng"} <= ckpt.keys()
    assert ckpt["step"] == 3 and ckpt["images_seen"] == 24
    assert type(ckpt["config"]) is dict and ckpt["config"]["levels"] == 2 and ckpt["config"]["transitions"] == [750]
    assert all(type(v) in (str, int, float, bool, list, type(None)) for v in ckpt["config"].values())
    assert len(ckpt["rng"]) == 1 and set(ckpt["rng"][0]) == {"shared", "local", "noise", "default_cpu"}
    assert len(ckpt["optimizer"]["state"]) > 0
    # The EMA averages the weights: after 3 steps it is not the model's last weights.
    model, ema = ckpt["model"], ckpt["ema"]
    assert model.keys() == ema.keys()
    assert any(not torch.equal(model[k], ema[k]) for k in model)

    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [2, 3]  # every log_every steps, and at the end
    assert all(math.isfinite(r["loss"]) and r["loss_per_path"] for r in log)
    assert set().union(*(r["loss_per_path"] for r in log)) <= {"16->16", "8->8", "8->16"}

    with Image.open(tmp_path / "samples_0000003.png") as grid:
        assert grid.mode == "L" and grid.size == (2 * 18 + 2, 2 * 18 + 2)  # 2 x 2 grayscale images, 2-px gaps


def test_a_fresh_run_starts_a_new_log(tmp_path, cache_dir):
    for _ in range(2):
        fit(tmp_path, cache_dir, "--max_steps", "1", "--sample_every", "0")
    assert [r["step"] for r in read_log(tmp_path)] == [1]


def test_time_budget_stops_at_a_log_with_a_checkpoint(tmp_path, cache_dir):
    ckpt = fit(tmp_path, cache_dir, "--max_steps", "100", "--log_every", "2", "--time_budget", "1e-9")
    assert ckpt["step"] == 2 and (tmp_path / "samples_0000002.png").is_file()


def test_micro_batches_accumulate_the_same_gradient(tmp_path, cache_dir):
    whole = fit(tmp_path / "whole", cache_dir, "--max_steps", "2", "--sample_every", "0")
    parts = fit(tmp_path / "parts", cache_dir, "--max_steps", "2", "--sample_every", "0", "--micro_batch", "2")
    for key, value in whole["model"].items():
        torch.testing.assert_close(parts["model"][key], value, rtol=0, atol=1e-6, msg=key)
    losses = [read_log(tmp_path / name)[-1]["loss"] for name in ("whole", "parts")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # the logged loss is the batch mean either way


def test_class_conditional_run(tmp_path, cache_dir):
    ckpt = fit(tmp_path, cache_dir, "--class_cond", "True", "--max_steps", "2", "--sample_every", "0")
    assert ckpt["config"]["num_classes"] == 10
    assert ckpt["model"]["label_embed.weight"].shape[0] == 11  # and the null label of classifier-free guidance


@pytest.mark.parametrize("args, paths", [
    (["--transition_share", "1"], {"8->16"}),  # every batch on the resolution-changing step
    (["--baseline", "eps"], {"16->16"}),  # DDPM-eps on the full UNet: one level
])
def test_options_train(tmp_path, cache_dir, args, paths):
    fit(tmp_path, cache_dir, "--max_steps", "2", "--log_every", "1", "--sample_every", "0", *args)
    assert all(set(r["loss_per_path"]) == paths and math.isfinite(r["loss"]) for r in read_log(tmp_path))
    assert all(set(r["grad_norm_per_path"]) == paths and all(0 < v < math.inf for v in r["grad_norm_per_path"].values())
               for r in read_log(tmp_path))


def test_msf_method_trains_and_resumes_exactly(tmp_path, cache_dir):
    """--method msf: both MSF networks train through the same loop, checkpoints and EMA as SSD."""
    args = ("--method", "msf", "--log_every", "1", "--sample_every", "0")
    straight = fit(tmp_path / "straight", cache_dir, "--max_steps", "3", *args)
    fit(tmp_path / "resumed", cache_dir, "--max_steps", "1", *args)
    resumed = fit(tmp_path / "resumed", cache_dir, "--max_steps", "3", "--resume", "True", *args)
    assert_same(straight["model"], resumed["model"], "model")
    assert straight["config"]["method"] == "msf" and straight["config"]["levels"] == 1
    assert {k.split(".")[0] for k in straight["model"]} == {"base", "residual"}
    assert straight["model"]["residual.stem.weight"].shape[1] == 2  # the noisy residual and the upsampled base
    assert all(set(r["loss_per_path"]) == {"msf"} and math.isfinite(r["loss"]) for r in read_log(tmp_path / "straight"))
    with pytest.raises(ValueError, match="other configuration.*method"):
        fit(tmp_path / "straight", cache_dir, "--max_steps", "4", "--resume", "True")  # an SSD run cannot resume it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("method", ["ssd", "msf"])
def test_cuda_graphs_train_as_eager_does(tmp_path, cache_dir, method):
    """Replaying recorded paths gives the weights of plain eager steps (same seed, same batches, both paths)."""
    args = ("--max_steps", "6", "--sample_every", "0", "--compile", "False", "--method", method,
            "--transition_share", "0.5", "--micro_batch", "4")
    eager = fit(tmp_path / "eager", cache_dir, "--cuda_graphs", "False", *args)
    graphed = fit(tmp_path / "graphed", cache_dir, "--cuda_graphs", "True", *args)
    for key, value in eager["model"].items():
        torch.testing.assert_close(graphed["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert read_log(tmp_path / "graphed")[-1]["loss"] == pytest.approx(read_log(tmp_path / "eager")[-1]["loss"],
                                                                       rel=1e-3)


def test_seed_sets_the_initial_weights(tmp_path, cache_dir):
    first, again, other = (train.Trainer(tiny_config(tmp_path, cache_dir, "--seed", seed)) for seed in "001")
    weights = [t.model.stem.weight for t in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert torch.equal(first.ema.stem.weight, weights[0]) and not first.ema.training  # sampling runs no dropout


def test_loss_decreases_on_a_fixed_batch(tmp_path, cache_dir):
    trainer = train.Trainer(tiny_config(tmp_path, cache_dir, "--lr", "1e-3"))
    images = trainer.data.images[:4]
    trainer.data = ImageData(images, trainer.data.labels[:4], trainer.data.num_classes, trainer.data.key)
    # A fixed evaluation: the same 4 images, steps and noise before and after training.
    x0 = torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    t = torch.tensor([0, 100, 300, 600])
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x_t, target, weight = training_example(trainer.ss, x0, t, noise=noise)

    def fixed_loss():
        with torch.no_grad():
            return weighted_mse(trainer.model(x_t, t, 16), target, weight).mean().item()

    before = fixed_loss()
    for _ in range(30):
        trainer.train_step()
    assert fixed_loss() < 0.25 * before


@pytest.mark.parametrize("dropout", ["0.0", "0.1"])  # dropout draws from the default generator, saved too
def test_resume_is_exact(tmp_path, cache_dir, dropout):
    args = ("--log_every", "1", "--sample_every", "0", "--dropout", dropout)
    straight = fit(tmp_path / "straight", cache_dir, "--max_steps", "4", *args)
    fit(tmp_path / "resumed", cache_dir, "--max_steps", "2", *args)
    resumed = fit(tmp_path / "resumed", cache_dir, "--max_steps", "4", "--resume", "True", *args)

    assert resumed["step"] == 4
    for key in ("model", "ema", "optimizer", "step", "images_seen", "rng"):
        assert_same(straight[key], resumed[key], key)  # bitwise: nothing on the CPU path is nondeterministic
    # The resumed run appends to the log; together the two halves are the straight run's log.
    logs = [read_log(tmp_path / name) for name in ("straight", "resumed")]
    assert [(r["step"], r["loss_per_path"]) for r in logs[0]] == [(r["step"], r["loss_per_path"]) for r in logs[1]]
    assert len({path for r in logs[0] for path in r["loss_per_path"]}) > 1  # the level changes across the resume


DDP_SCRIPT = """
import os
import sys
import torch
import train

steps = []  # (path, this rank's loss) of every step
train_step = train.Trainer.train_step


def recorded_step(self):
    loss, path, grad_norm = train_step(self)
    steps.append((path, loss.item()))
    return loss, path, grad_norm


train.Trainer.train_step = recorded_step
trainer = train.Trainer(train.parse_config(sys.argv[1:]))
if os.environ.get("PERTURB_RANK") == str(trainer.rank):  # a replica that drifted: the checkpoint must refuse it
    trainer.params[-1].data += 1e-3
trainer.fit()
torch.save(dict(model=trainer.model.state_dict(), ema=trainer.ema.state_dict(), steps=steps),
           f"{trainer.cfg['out_dir']}/rank{trainer.rank}.pt")
"""


def run_two_processes(tmp_path, cache_dir, max_steps, **env):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               *TINY, "--max_steps", str(max_steps), "--log_every", "2", "--out_dir", str(out),
               "--cache_dir", cache_dir]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120), out


def test_ddp_two_processes_stay_identical(tmp_path, cache_dir):
    result, out = run_two_processes(tmp_path, cache_dir, max_steps=4)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    paths = [[path for path, _ in rank["steps"]] for rank in ranks]
    assert paths[0] == paths[1] and len(paths[0]) == 4
    assert_same(ranks[0]["model"], ranks[1]["model"], "model")
    assert_same(ranks[0]["ema"], ranks[1]["ema"], "ema")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert_same(ckpt["model"], ranks[0]["model"], "checkpoint")
    assert ckpt["images_seen"] == 4 * 8  # the global batch, split over the two ranks
    # Each rank draws its own images (its own generator, saved for resuming), but the ranks share the path.
    local, shared = ([r[name] for r in ckpt["rng"]] for name in ("local", "shared"))
    assert not torch.equal(*local) and torch.equal(*shared)
    # The log holds the loss of the global batch: per path, the mean over both ranks and the steps since the last log.
    for record in read_log(out):
        window = [step for rank in ranks for step in rank["steps"][record["step"] - 2:record["step"]]]
        for path, value in record["loss_per_path"].items():
            losses = [loss for p, loss in window if p == path]
            assert value == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_ddp_refuses_to_checkpoint_ranks_out_of_step(tmp_path, cache_dir):
    result, out = run_two_processes(tmp_path, cache_dir, max_steps=2, PERTURB_RANK="1")
    assert result.returncode != 0
    assert "copies of the model differ at step 2" in result.stderr and "out of step" in result.stderr
    assert not (out / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# the command line and bad inputs


def test_parser_reads_booleans_and_key_equals_value():
    cfg = train.parse_config(["--flexi", "False", "--class_cond=1", "--compile=0", "--resume", "True",
                              "--lr=1e-3", "--out_dir", "123", "--data_dir", "2024", "--transition_share", "None",
                              "--res=16", "--max_steps=None"])
    assert cfg["flexi"] is False and cfg["class_cond"] is True and cfg["compile"] is False and cfg["resume"] is True
    assert cfg["lr"] == 1e-3 and cfg["out_dir"] == "123" and cfg["data_dir"] == "2024"  # folder names stay text
    assert cfg["transition_share"] is None and cfg["max_steps"] == 500  # None: the preset's value
    assert cfg["res"] == 16 and cfg["levels"] == 2  # the preset goes down to 8 px


def test_explicit_transitions():
    cfg = train.parse_config(["--res", "64", "--levels", "4", "--transitions", "69,212,396"])
    assert train.build_scale_space(cfg).transitions == [69, 212, 396]
    with pytest.raises(ValueError, match="increasing transition steps"):
        train.build_scale_space(train.parse_config(["--res", "64", "--levels", "4", "--transitions", "69,212"]))


def test_presets():
    celeba = train.parse_config(["--dataset", "celeba"])
    assert (celeba["res"], celeba["levels"], celeba["model"], celeba["batch_size"], celeba["lr"]) == \
        (64, 4, "paper", 128, 5e-5)
    assert (celeba["warmup"], celeba["grad_clip"]) == (500, 1.0)
    paper = train.parse_config(["--dataset", "celeba", "--lr", "1e-4", "--warmup", "0", "--grad_clip", "0"])
    assert (paper["lr"], paper["warmup"], paper["grad_clip"]) == (1e-4, 0, 0.0)  # the paper's exact settings
    big = train.parse_config(["--dataset", "celeba", "--res", "256"])
    assert (big["levels"], big["batch_size"], big["lr"], big["max_steps"]) == (6, 64, 5e-5, 300_000)
    assert train.parse_config(["--res", "4"])["levels"] == 1  # below 8 px: one level, not a math error
    eps = train.parse_config(["--baseline", "eps"])
    assert (eps["levels"], eps["flexi"], eps["parameterisation"]) == (1, False, "eps")


@pytest.mark.parametrize("argv, message", [
    (["--flexi", "maybe"], "expected True/False/1/0"),
    (["--max_steps", "ten"], "argument --max_steps: invalid int value: 'ten'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--compile", "2"], "argument --compile: expected True/False/1/0, got '2'"),
])
def test_parser_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "cubic"], "--schedule 'cubic': choose one of"),
    (["--baseline", "ddim"], "--baseline 'ddim': choose x0 or eps"),
])
def test_bad_settings_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_config(argv)


@pytest.mark.parametrize("args, error, message", [
    (["--dataset", "cifar"], ValueError, "unknown dataset 'cifar'"),
    (["--res", "24"], ValueError, "resolution 24 is not a power of two"),
    (["--levels", "6"], ValueError, "6 levels halve 16 px 5 times"),
    (["--model", "huge"], ValueError, "--model 'huge': choose paper or tiny"),
    (["--dataset", "celeba"], ValueError, "dataset 'celeba' needs data_dir"),
    (["--dataset", "celeba", "--data_dir", "no_such_folder"], FileNotFoundError,
     "data folder no_such_folder does not exist"),
    (["--resume", "True"], FileNotFoundError, "no checkpoint at"),
    (["--device", "cpu", "--cuda_graphs", "True"], ValueError, "--cuda_graphs True needs a CUDA device"),
    (["--device", "cpu", "--bf16", "True"], ValueError, "--bf16 True needs a CUDA device"),
])
def test_bad_inputs_get_their_message(tmp_path, cache_dir, args, error, message):
    with pytest.raises(error, match=message):
        train.Trainer(tiny_config(tmp_path, cache_dir, *args))


def test_corrupt_image_in_a_folder_is_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.new("RGB", (20, 24), (40 * k, 80, 120)).save(folder / f"good{k}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    argv = ["--dataset", "folder", "--data_dir", str(folder), "--cache_dir", str(tmp_path / "cache"),
            "--res", "16", "--out_dir", str(tmp_path / "out")]
    with pytest.warns(UserWarning, match="skipped 1 unreadable images of 4 .*broken.jpg"):
        trainer = train.Trainer(train.parse_config(argv))
    assert len(trainer.data) == 3 and trainer.cfg["channels"] == 3
    with pytest.raises(ValueError, match="--class_cond True needs class labels and folder has none"):
        train.Trainer(train.parse_config(argv + ["--class_cond", "True"]))


def test_resume_from_another_configuration_fails(tmp_path, cache_dir):
    fit(tmp_path, cache_dir, "--max_steps", "1", "--sample_every", "0")
    with pytest.raises(ValueError, match=r"another configuration \(levels: checkpoint 2 vs now 1"):
        train.Trainer(tiny_config(tmp_path, cache_dir, "--levels", "1", "--resume", "True"))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    # Logs are rare here, but every checkpoint is checked before it is written.
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d+ .*the last good checkpoint"):
        fit(tmp_path, cache_dir, "--lr", "1e30", "--max_steps", "20", "--log_every", "100", "--ckpt_every", "1")
    log = read_log(tmp_path)
    assert log[-1]["loss"] is None and all(math.isfinite(r["loss"]) for r in log[:-1])  # null: standard JSON
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == log[-1]["step"] - 1
    assert all(v.isfinite().all() for part in ("model", "ema") for v in ckpt[part].values())


def test_nan_gradients_behind_a_finite_loss_are_caught(tmp_path, cache_dir):
    trainer = train.Trainer(tiny_config(tmp_path, cache_dir, "--max_steps", "5", "--ckpt_every", "1"))
    # The third step's gradient is NaN: its loss is finite, the weights after its update are not.
    trainer.model.head[-1].weight.register_hook(lambda grad: grad * math.nan if trainer.step == 2 else grad)
    with pytest.raises(FloatingPointError, match=r"at step 3 \(loss [-\d.e]+, weights not finite\); the last good "
                                                 r"checkpoint \(step 2\)"):
        trainer.fit()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())
