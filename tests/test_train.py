"""
Tests of train.py on the tiny config (16 px, 2 levels, batch 8, CPU): outputs, learning, exact resume, DDP over two
gloo processes, the command line, and the message of every bad input.
"""
import copy
import errno
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import train
from data import ImageData, get_batch, load_dataset
from flexi_unet import Block, GroupNorm, memory_format

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--res", "16", "--levels", "2", "--batch_size", "8", "--sample_n", "4", "--sample_steps", "5"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # The bundled Fashion-MNIST is prepared once for the whole file, outside the repository.
    return str(tmp_path_factory.mktemp("cache"))


def tiny_argv(out_dir, cache_dir, *args):
    return TINY + ["--out_dir", str(out_dir), "--cache_dir", cache_dir, *args]


def fit(out_dir, cache_dir, *args):
    """Train the tiny config and return its checkpoint, read as a resumed run reads it."""
    train.main(tiny_argv(out_dir, cache_dir, *args))
    return common.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


def tiny_run(tmp_path, cache_dir, *args):
    """The tiny config's settings, data and training state, as train.main builds them."""
    cfg = train.parse_config(tiny_argv(tmp_path, cache_dir, *args))
    data = load_dataset(cfg["dataset"], cfg["res"], cfg["data_dir"], cfg["cache_dir"])
    return cfg, data, train.build_run(cfg, data)


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


def test_help_shows_every_setting_with_its_default_and_meaning():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for name, default, help_text in (entry for group in train.SETTINGS.values() for entry in group):
        assert f"--{name}" in text and f"[default: {default}]" in text, name
    assert "global batch over all GPUs (None: paper model 128, 64 at 256 px; tiny 64)" in text


def test_tiny_run_writes_checkpoint_log_and_samples(tmp_path, cache_dir):
    ckpt = fit(tmp_path, cache_dir, "--max_steps", "3", "--log_every", "2", "--ckpt_every", "2")

    assert {"format", "spec", "model", "ema", "optimizer", "step", "images_seen", "config", "rng"} <= ckpt.keys()
    assert ckpt["step"] == 3 and ckpt["images_seen"] == 24
    assert ckpt["spec"]["method"] == "ssd" and ckpt["spec"]["scale_space"]["transitions"] == [750]
    assert type(ckpt["config"]) is dict and ckpt["config"]["levels"] == 2
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
    assert {"stem", "head", "encoder.0"} <= log[0]["grad_norm_per_block"].keys()  # the block monitor
    assert log[0]["attn_logit_max_per_block"] and log[0]["update_ratio_per_block"]

    with Image.open(tmp_path / "samples_0000003.png") as grid:
        assert grid.mode == "L" and grid.size == (2 * 18 + 2, 2 * 18 + 2)  # 2 x 2 grayscale images, 2-px gaps


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
    assert ckpt["spec"]["unet"]["num_classes"] == 10
    assert ckpt["model"]["label_embed.weight"].shape[0] == 11  # and the null label of classifier-free guidance


@pytest.mark.parametrize("args, paths", [
    (["--transition_share", "1"], {"8->16"}),  # every batch on the resolution-changing step
    (["--method", "ddpm_eps", "--levels", "1"], {"16->16"}),  # DDPM-eps on the full UNet: one level
    (["--qk_norm", "False", "--attention_fp32", "True"], {"16->16", "8->8", "8->16"}),  # the paper's attention
    (["--preserve_snr", "True"], {"16->16", "8->8", "8->16"}),  # the signal scaled at the resolution change
    (["--level_shares", "1e-12,1", "--transition_share", "0"], {"8->8"}),  # every batch on the coarse level
])
def test_options_train(tmp_path, cache_dir, args, paths):
    fit(tmp_path, cache_dir, "--max_steps", "4", "--log_every", "1", "--sample_every", "0", *args)
    log = read_log(tmp_path)
    assert set().union(*(r["loss_per_path"] for r in log)) <= paths and all(math.isfinite(r["loss"]) for r in log)
    assert all(0 < v < math.inf for r in log for v in r["grad_norm_per_path"].values())


def test_msf_method_trains_and_resumes_exactly(tmp_path, cache_dir):
    """--method msf: both MSF networks train through the same loop, checkpoints and EMA as SSD."""
    args = ("--method", "msf", "--levels", "1", "--log_every", "1", "--sample_every", "0")
    straight = fit(tmp_path / "straight", cache_dir, "--max_steps", "3", *args)
    fit(tmp_path / "resumed", cache_dir, "--max_steps", "1", *args)
    resumed = fit(tmp_path / "resumed", cache_dir, "--max_steps", "3", "--resume", "True", *args)
    assert_same(straight["model"], resumed["model"], "model")
    assert straight["spec"]["method"] == "msf"
    assert {k.split(".")[0] for k in straight["model"]} == {"base", "residual"}
    assert straight["model"]["residual.stem.weight"].shape[1] == 2  # the noisy residual and the upsampled base
    assert all(set(r["loss_per_path"]) == {"msf"} and math.isfinite(r["loss"]) for r in read_log(tmp_path / "straight"))
    with pytest.raises(ValueError, match="other configuration.*method: checkpoint 'msf' vs now 'ssd'"):
        fit(tmp_path / "straight", cache_dir, "--max_steps", "4", "--resume", "True")  # an SSD run cannot resume it


@pytest.mark.parametrize("method", ["ssd", "ddpm_x0", "msf"])
def test_every_method_builds_compiled_with_the_compile_settings(tmp_path, cache_dir, method):
    """--compile True hands the compile settings to every method's model (compilation itself waits for a forward)."""
    levels = ["--levels", "1"] if method != "ssd" else []
    _, _, run = tiny_run(tmp_path, cache_dir, "--method", method, *levels, "--compile", "True",
                         "--dense_skip_grads", "False", "--per_channel_norm", "False", "--norm_row_blocks", "4",
                         "--norm_fused_grads", "True")
    blocks = [m for m in run.model.modules() if isinstance(m, Block)]
    assert blocks and not any(m.dense_skip_grads for m in blocks)
    norms = [m for m in run.model.modules() if isinstance(m, GroupNorm)]
    assert norms and not any(m.per_channel for m in norms) and all(m.row_blocks == 4 and m.fused_grads for m in norms)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("method", ["ssd", "msf"])
def test_cuda_graphs_train_as_eager_does(tmp_path, cache_dir, method):
    """Replaying recorded paths gives the weights of plain eager steps (same seed, same batches, both paths)."""
    args = ("--max_steps", "6", "--sample_every", "0", "--compile", "False", "--method", method, "--levels",
            "2" if method == "ssd" else "1", "--transition_share", "0.5", "--micro_batch", "4")
    eager = fit(tmp_path / "eager", cache_dir, "--cuda_graphs", "False", *args)
    graphed = fit(tmp_path / "graphed", cache_dir, "--cuda_graphs", "True", *args)
    for key, value in eager["model"].items():
        torch.testing.assert_close(graphed["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert read_log(tmp_path / "graphed")[-1]["loss"] == pytest.approx(read_log(tmp_path / "eager")[-1]["loss"],
                                                                       rel=1e-3)


def test_recorded_paths_write_the_gradients_backward_would(monkeypatch):
    """PathGraphs on the CPU, CUDA's graph calls standing in as plain calls (a recording runs its work once; a replay
    does nothing), so each micro-batch here records a graph of its own: the first micro-batch's gradients replace
    the buffers' stale values, the second's add to them, as loss.backward() accumulates, and parameters off the
    path keep no gradient."""
    import contextlib
    import cuda_graphs

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    for name, value in dict(Stream=Stream, current_stream=Stream, stream=lambda s: contextlib.nullcontext(),
                            graph_pool_handle=lambda: None, CUDAGraph=Graph,
                            graph=lambda g, pool: contextlib.nullcontext()).items():
        monkeypatch.setattr(torch.cuda, name, value)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    net[2].requires_grad_(False)  # a block off the path
    loss_of = lambda x: net(x).square().sum()
    batches = [torch.randn(3, 4) for _ in range(2)]
    for x in batches:
        loss_of(x).backward()
    expected = [p.grad for p in net.parameters()]
    graphs = cuda_graphs.PathGraphs(list(net.parameters()))
    graphs.grad_buffers = [torch.full_like(p, 7.0) for p in net.parameters()]  # what an earlier step left
    net.zero_grad(set_to_none=True)
    losses = [graphs.backward(("8->8", 3), loss_of, [x], first=i == 0) for i, x in enumerate(batches)]
    for p, grad in zip(net.parameters(), expected):
        assert (p.grad is None) == (grad is None)
        if grad is not None:
            torch.testing.assert_close(p.grad, grad)
    torch.testing.assert_close(losses[1], loss_of(batches[1]).detach())
    assert set(graphs.graphs) == {("8->8", 3, True), ("8->8", 3, False)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", ["True", "False"])
def test_a_cuda_training_step_never_waits_for_the_gpu(tmp_path, cache_dir, graphs):
    """train_step only issues work: no .item(), no blocking copy, no synchronisation on any path, replayed or not,
    so the host runs ahead of the GPU."""
    cfg, data, _ = tiny_run(tmp_path, cache_dir, "--compile", "False", "--cuda_graphs", graphs, "--levels", "2",
                            "--transition_share", "0.5")
    run = train.build_run(cfg, data, device=torch.device("cuda"))
    x0, _ = get_batch(data, cfg["batch_size"], torch.Generator().manual_seed(0), run.device)
    for path in run.method.paths:
        t = run.method.path_steps(path, cfg["batch_size"])
        train.train_step(run, cfg, x0, t)  # the first step may wait: recording, cuDNN's search, the optimiser's state
        torch.cuda.set_sync_debug_mode("error")
        try:
            train.train_step(run, cfg, x0, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_seed_sets_the_initial_weights(tmp_path, cache_dir):
    first, again, other = (tiny_run(tmp_path, cache_dir, "--seed", seed)[2] for seed in "001")
    weights = [run.model.stem.weight for run in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert torch.equal(first.ema.stem.weight, weights[0]) and not first.ema.training  # sampling runs no dropout


def test_loss_decreases_on_a_fixed_batch(tmp_path, cache_dir):
    cfg, data, run = tiny_run(tmp_path, cache_dir, "--lr", "1e-3")
    few = ImageData(data.images[:4], None, 0, data.key)
    # A fixed evaluation: the same 4 images, steps and noise before and after training.
    x0, _ = get_batch(few, 4, torch.Generator().manual_seed(0), "cpu")
    t = torch.tensor([0, 100, 300, 600])
    noise = torch.Generator().manual_seed(0)
    example = run.method.example(x0, t, lambda shape: torch.randn(shape, generator=noise))

    def fixed_loss():
        with torch.no_grad():
            return run.method.loss(run.model, example).mean().item()

    before = fixed_loss()
    for _ in range(30):
        t_batch = run.method.draw_steps(8, run.gens["shared"], run.gens["local"])
        train.train_step(run, cfg, *get_batch(few, 8, run.gens["local"], "cpu")[:1], t_batch)
    assert fixed_loss() < 0.25 * before


@pytest.mark.parametrize("dropout", ["0.0", "0.1"])  # dropout draws from the default generator, saved too
def test_resume_is_exact_and_the_log_reads_as_one_run(tmp_path, cache_dir, dropout):
    args = ("--log_every", "1", "--sample_every", "0", "--dropout", dropout)
    straight = fit(tmp_path / "straight", cache_dir, "--max_steps", "4", *args)
    fit(tmp_path / "resumed", cache_dir, "--max_steps", "2", *args)
    # A run killed after step 3 left a log line that its checkpoint (step 2) does not cover: it runs again.
    with open(tmp_path / "resumed" / "log.jsonl", "a") as f:
        f.write(json.dumps(dict(read_log(tmp_path / "resumed")[-1], step=3)) + "\n")
    resumed = fit(tmp_path / "resumed", cache_dir, "--max_steps", "4", "--resume", "True", *args)

    assert resumed["step"] == 4
    for key in ("model", "ema", "optimizer", "step", "images_seen", "rng"):
        assert_same(straight[key], resumed[key], key)  # bitwise: nothing on the CPU path is nondeterministic
    logs = [read_log(tmp_path / name) for name in ("straight", "resumed")]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    assert [r["loss_per_path"] for r in logs[0]] == [r["loss_per_path"] for r in logs[1]]
    assert len({path for r in logs[0] for path in r["loss_per_path"]}) > 1  # the level changes across the resume


def test_a_finished_run_resumed_says_so_and_trains_no_further(tmp_path, cache_dir, capsys, monkeypatch):
    """Resuming a run that has trained its steps or its minutes (a queue run again after a stop) compiles nothing,
    adds no steps and rewrites nothing; a larger budget trains on."""
    args = ("--log_every", "2", "--sample_every", "0")
    fit(tmp_path, cache_dir, "--max_steps", "2", *args)
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    with monkeypatch.context() as patch:
        patch.setattr(train, "compile_paths", lambda *a: pytest.fail("a finished run was compiled"))
        for budget in (("--max_steps", "2"), ("--max_steps", "100", "--time_budget", "1e-9")):
            capsys.readouterr()
            fit(tmp_path, cache_dir, *budget, "--resume", "True", "--compile", "True", *args)
            assert "has finished its training (2 steps" in capsys.readouterr().out
            assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert fit(tmp_path, cache_dir, "--max_steps", "4", "--resume", "True", *args)["step"] == 4


DDP_SCRIPT = """
import os
import sys
import torch
import train

steps = []  # (path, this rank's loss) of every step
train_step, build_run = train.train_step, train.build_run


def recorded_step(run, cfg, x0, t, y=None):
    loss, path, grad_norm = train_step(run, cfg, x0, t, y)
    steps.append((path, loss.item()))
    return loss, path, grad_norm


def drifted_run(*args, **kwargs):
    run = build_run(*args, **kwargs)
    if os.environ.get("PERTURB_RANK") == str(run.rank):  # a replica that drifted: the checkpoint must refuse it
        run.params[-1].data += 1e-3
    return run


train.train_step, train.build_run = recorded_step, drifted_run
run = train.main(sys.argv[1:])
torch.save(dict(model=run.model.state_dict(), ema=run.ema.state_dict(), steps=steps),
           f"{sys.argv[sys.argv.index('--out_dir') + 1]}/rank{run.rank}.pt")
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
    with pytest.raises(TypeError):
        cfg["lr"] = 1.0  # settled once: no later writes


def test_explicit_transitions():
    cfg = train.parse_config(["--dataset", "celeba", "--levels", "4", "--transitions", "69,212,396"])
    assert train.method_spec(cfg, 3, 0)["scale_space"]["transitions"] == [69, 212, 396]
    with pytest.raises(ValueError, match="increasing transition steps"):
        train.parse_config(["--dataset", "celeba", "--levels", "4", "--transitions", "69,212"])


def test_presets_follow_the_model():
    celeba = train.parse_config(["--dataset", "celeba"])
    assert (celeba["res"], celeba["levels"], celeba["model"], celeba["batch_size"], celeba["lr"]) == \
        (64, 4, "paper", 128, 5e-5)
    assert (celeba["warmup"], celeba["grad_clip"], celeba["qk_norm"]) == (500, 1.0, True)
    paper = train.parse_config(["--dataset", "celeba", "--lr", "1e-4", "--warmup", "0", "--grad_clip", "0",
                                "--qk_norm", "False"])
    assert (paper["lr"], paper["warmup"], paper["grad_clip"], paper["qk_norm"]) == (1e-4, 0, 0.0, False)
    big = train.parse_config(["--dataset", "celeba", "--res", "256"])
    assert (big["levels"], big["batch_size"], big["lr"], big["max_steps"]) == (6, 64, 5e-5, 300_000)
    quick = train.parse_config(["--dataset", "celeba", "--model", "tiny"])  # a quick try on real faces
    assert (quick["batch_size"], quick["lr"], quick["warmup"], quick["max_steps"]) == (64, 2e-4, 50, 500)
    assert quick["levels"] == 3  # the tiny model has three encoder levels
    assert train.parse_config(["--res", "4"])["levels"] == 1  # below 8 px: one level, not a math error
    eps = train.parse_config(["--method", "ddpm_eps"])
    assert (eps["levels"], eps["flexi"]) == (1, False)
    assert train.method_spec(eps, 1, 0)["parameterisation"] == "eps"


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
    (["--schedule", "cubic"], "--schedule 'cubic': choose one of convex"),
    (["--method", "ddim"], "--method 'ddim': choose one of ssd, ddpm_x0, ddpm_eps, msf"),
    (["--dataset", "cifar"], "--dataset 'cifar': choose one of celeba"),
    (["--model", "huge"], "--model 'huge': choose one of paper, tiny"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--norm_row_blocks", "0"], "--norm_row_blocks 0: must be at least 1"),
    (["--batch_size", "-4"], "--batch_size -4: must be at least 1"),
    (["--levels", "0"], "--levels 0: must be at least 1"),
    (["--T", "0"], "--T 0: must be at least 1"),
    (["--T", "-5"], "--T -5: must be at least 1"),
    (["--max_steps", "0"], "--max_steps 0: must be at least 1"),
    (["--ckpt_every", "0"], "--ckpt_every 0: must be at least 1"),
    (["--log_every", "0"], "--log_every 0: must be at least 1"),
    (["--micro_batch", "0"], "--micro_batch: must be at least 1"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--warmup", "-1"], "--warmup -1: must be 0 or more"),
    (["--dropout", "1.5"], r"--dropout 1.5: must be in \[0, 1\)"),
    (["--transitions", "abc"], "--transitions 'abc': give increasing steps"),
    (["--res", "24"], "--res 24: not a power of two"),
    (["--levels", "6"], "6 levels halve 16 px 5 times"),
    (["--method", "ddpm_x0", "--levels", "3"], "--method ddpm_x0 trains one level"),
    (["--device", "cpu", "--cuda_graphs", "True"], "--cuda_graphs True needs a CUDA device"),
    (["--upsample_transitions", "True", "--method", "ddpm_x0"], "--upsample_transitions True routes the steps that"),
    (["--upsample_transitions", "True", "--flexi", "False"], "and this run has none"),
    (["--preserve_snr", "True", "--method", "msf"], "--preserve_snr True scales the signal where the resolution"),
    (["--level_shares", "1,2,3"], r"--level_shares: give one positive share per level \(2, finest first\)"),
    (["--level_shares", "1,-1"], "--level_shares: give one positive share per level"),
    (["--level_shares", "1", "--method", "ddpm_x0", "--levels", "1"], "--level_shares: .* of an ssd run"),
    (["--level_shares", "a,b"], "--level_shares 'a,b': give one share per level"),
    (["--device", "cpu", "--bf16", "True"], "--bf16 True needs a CUDA device"),
    (["--resume", "True", "--overwrite", "True"], "exclude each other"),
])
def test_bad_settings_are_named_before_anything_runs(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_config(["--res", "16"] + argv if "--res" not in argv else argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_cuda_on_a_cpu_build_says_what_to_install():
    with pytest.raises(ValueError, match="CPU-only build; .*install a CUDA build"):
        train.parse_config(["--device", "cuda"])


def test_errors_are_one_line_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--batch_size", "-4", "--out_dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --batch_size -4: must be at least 1"


@pytest.mark.parametrize("args, error, message", [
    (["--dataset", "celeba", "--model", "tiny"], ValueError, "dataset 'celeba' needs data_dir"),
    (["--dataset", "celeba", "--model", "tiny", "--data_dir", "no_such_folder"], FileNotFoundError,
     "data folder no_such_folder does not exist"),
    (["--resume", "True"], FileNotFoundError, "no checkpoint at .* to continue"),
])
def test_bad_inputs_get_their_message(tmp_path, cache_dir, args, error, message):
    with pytest.raises(error, match=message):
        train.main(tiny_argv(tmp_path, cache_dir, *args))


def test_corrupt_image_in_a_folder_is_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.new("RGB", (20, 24), (40 * k, 80, 120)).save(folder / f"good{k}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    argv = ["--dataset", "folder", "--data_dir", str(folder), "--cache_dir", str(tmp_path / "cache"),
            "--res", "16", "--out_dir", str(tmp_path / "out"), "--max_steps", "1", "--sample_n", "1",
            "--sample_steps", "3"]
    with pytest.warns(UserWarning) as warned:
        run = train.main(argv)
    messages = [str(w.message) for w in warned]
    assert any("skipped 1 unreadable images of 4" in m and "broken.jpg" in m for m in messages)
    assert any("only 3 images" in m for m in messages)  # too few to learn more than copies
    assert run.method.channels == 3
    with pytest.warns(UserWarning, match="only 3 images"), \
            pytest.raises(ValueError, match="--class_cond True needs class labels and folder has none"):
        train.main(argv + ["--class_cond", "True", "--out_dir", str(tmp_path / "cond")])


def test_resume_from_another_configuration_fails(tmp_path, cache_dir):
    fit(tmp_path, cache_dir, "--max_steps", "1", "--sample_every", "0")
    with pytest.raises(ValueError, match=r"another configuration \(levels: checkpoint 2 vs now 1"):
        train.main(tiny_argv(tmp_path, cache_dir, "--levels", "1", "--resume", "True"))


def test_moments_loaded_in_the_other_layout_take_their_parameters_layout():
    """Fused AdamW (as on CUDA; the CPU has it too) pairs parameter and moments in memory order. A channels-last
    model resumed from a contiguous checkpoint gets its moments rearranged, and its next update is the one the
    contiguous run makes."""
    torch.manual_seed(0)
    weight, grads = torch.randn(4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3)

    def step(p, opt, grad):
        p.grad = grad.contiguous(memory_format=memory_format(p))
        opt.step()

    p = torch.nn.Parameter(weight.clone())
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    step(p, opt, grads[0])
    saved = copy.deepcopy(opt.state_dict())
    resumed = torch.nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last))
    step(p, opt, grads[1])  # the run that never stopped

    resumed_opt = torch.optim.AdamW([resumed], lr=0.1, fused=True)
    resumed_opt.load_state_dict(saved)
    train.give_moments_their_parameters_layout(resumed_opt)
    assert resumed_opt.state[resumed]["exp_avg"].stride() == resumed.stride()
    step(resumed, resumed_opt, grads[1])
    torch.testing.assert_close(resumed.detach(), p.detach(), rtol=0, atol=1e-6)


def test_a_checkpoint_written_before_an_option_existed_resumes(tmp_path, cache_dir):
    # Options added later default to the behaviour before them: a checkpoint without them is the same run.
    fit(tmp_path, cache_dir, "--max_steps", "1", "--sample_every", "0")
    path = os.path.join(tmp_path, "ckpt.pt")
    ckpt = common.load_checkpoint(path)
    del ckpt["spec"]["unet"]["upsample_transitions"], ckpt["spec"]["scale_space"]["preserve_snr"]
    del ckpt["spec"]["level_shares"], ckpt["config"]["level_shares"]
    del ckpt["config"]["upsample_transitions"], ckpt["config"]["preserve_snr"]
    common.save_checkpoint(path, ckpt)
    assert fit(tmp_path, cache_dir, "--max_steps", "2", "--sample_every", "0", "--resume", "True")["step"] == 2
    with pytest.raises(ValueError, match="upsample_transitions: checkpoint False vs now True"):  # a real change fails
        train.main(tiny_argv(tmp_path, cache_dir, "--upsample_transitions", "True", "--resume", "True"))


# -----------------------------------------------------------------------------
# nothing lost: the run folder, checkpoints, divergence


def test_a_folder_that_holds_a_run_is_never_overwritten_by_accident(tmp_path, cache_dir):
    fit(tmp_path, cache_dir, "--max_steps", "3", "--log_every", "1", "--sample_every", "0")
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    with pytest.raises(FileExistsError, match="already holds a run .*--resume True .*--overwrite True"):
        fit(tmp_path, cache_dir, "--max_steps", "1")
    with pytest.raises(ValueError, match="--max_steps 0"):  # a bad flag fails before the folder is touched
        fit(tmp_path, cache_dir, "--max_steps", "0")
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    ckpt = fit(tmp_path, cache_dir, "--max_steps", "1", "--overwrite", "True", "--sample_every", "0")
    assert ckpt["step"] == 1 and [r["step"] for r in read_log(tmp_path)] == [1]


def test_a_second_run_on_the_same_folder_stops_clearly(tmp_path, cache_dir):
    lock = common.claim_run_folder(str(tmp_path))  # a run in progress holds it
    try:
        with pytest.raises(FileExistsError, match="another run is using"):
            fit(tmp_path, cache_dir, "--max_steps", "1")
    finally:
        lock.close()
    fit(tmp_path, cache_dir, "--max_steps", "1", "--sample_every", "0")  # free again


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, cache_dir, monkeypatch):
    fit(tmp_path, cache_dir, "--max_steps", "2", "--sample_every", "0")
    before = (tmp_path / "ckpt.pt").read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.torch, "save", full_disk)
    with pytest.raises(OSError, match="the disk is full: could not write .*ckpt.pt \\(the previous checkpoint is kept"):
        fit(tmp_path, cache_dir, "--max_steps", "4", "--resume", "True", "--sample_every", "0")
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("content, message", [
    (b"garbage bytes, not a zip", "is not a checkpoint written by torch.save"),
    ("truncated", "is truncated or corrupt"),
    ("old format", "was written by an older version of train.py"),
])
def test_corrupt_checkpoints_are_named(tmp_path, cache_dir, content, message):
    fit(tmp_path, cache_dir, "--max_steps", "1", "--sample_every", "0")
    path = tmp_path / "ckpt.pt"
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "old format":
        torch.save({"config": {"levels": 2}, "model": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        fit(tmp_path, cache_dir, "--max_steps", "2", "--resume", "True")


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d+ .*the last good checkpoint"):
        fit(tmp_path, cache_dir, "--lr", "1e30", "--max_steps", "20", "--log_every", "100", "--ckpt_every", "1")
    log = read_log(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in log[:-1])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == log[-1]["step"] - 1
    assert all(v.isfinite().all() for part in ("model", "ema") for v in ckpt[part].values())


def test_a_finite_but_exploded_loss_is_no_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    """A loss 100x the recent ones stops the run before its checkpoint; the kept one is from before."""
    train_step = train.train_step

    def exploding(run, cfg, x0, t, y=None):
        if run.step == 6:  # the weights blow up before step 7: its loss is huge but finite
            run.model.head[-1].weight.data *= 1e5
        return train_step(run, cfg, x0, t, y)

    monkeypatch.setattr(train, "train_step", exploding)
    with pytest.raises(FloatingPointError, match=r"diverged at step 7 \(loss [\d.e+]+, \d+x the median of the "
                                                 r"recent losses of path"):
        fit(tmp_path, cache_dir, "--max_steps", "20", "--ckpt_every", "1", "--lr", "1e-3", "--warmup", "0",
            "--sample_every", "0")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and math.isfinite(read_log(tmp_path)[-1]["loss"])


def test_nan_gradients_behind_a_finite_loss_are_caught(tmp_path, cache_dir, monkeypatch):
    build_run = train.build_run

    def poisoned(*args, **kwargs):
        run = build_run(*args, **kwargs)
        # The third step's gradient is NaN: its loss is finite, the weights after its update are not.
        run.model.head[-1].weight.register_hook(lambda grad: grad * math.nan if run.step == 2 else grad)
        return run

    monkeypatch.setattr(train, "build_run", poisoned)
    with pytest.raises(FloatingPointError, match=r"at step 3 \(loss [-\d.e]+, weights not finite\); the last good "
                                                 r"checkpoint \(step 2\)"):
        fit(tmp_path, cache_dir, "--max_steps", "5", "--ckpt_every", "1")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_the_progress_bar_moves_every_step(tmp_path, cache_dir, monkeypatch):
    """The bar counts every step (no sync needed), not only the log lines; compilation has its own bar."""
    bars = []

    class Bar:
        def __init__(self, iterable=None, **kwargs):
            self.iterable, self.kwargs, self.updates = iterable, kwargs, []
            bars.append(self)

        def __iter__(self):
            return iter(self.iterable)

        def update(self, n=1):
            self.updates.append(n)

        def set_postfix_str(self, text):
            pass

        def write(self, text):
            pass

        def close(self):
            pass

    monkeypatch.setattr(train, "tqdm", Bar)
    fit(tmp_path, cache_dir, "--max_steps", "5", "--log_every", "100", "--sample_every", "0")
    training = [b for b in bars if b.kwargs.get("desc") == "training"]
    assert len(training) == 1 and training[0].updates == [1] * 5 and training[0].kwargs["total"] == 5
