"""common.py: checkpoints, the run folder's lock, settings on the command line, generators and the device."""
import errno
import fractions
import os
import random

import pytest
import torch

import common
from common import (claim_run_folder, load_checkpoint, parse_settings, pick_device, rng_states, run_script,
                    save_checkpoint, set_rng_states)


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"format": 1, "spec": {"method": "ssd", "unet": {"res": 16, "channel_mult": [1, 2]}},
            "model": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3, dtype=torch.float16)},
            "step": 7 + seed, "images_seen": 448, "config": {"lr": 2e-4, "resume": False, "data_dir": None},
            "rng": [{"local": torch.Generator().manual_seed(seed).get_state()}]}


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


# -----------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, state(0))
    assert_same(load_checkpoint(path), state(0))
    save_checkpoint(path, state(1))  # replaces the previous one
    assert_same(load_checkpoint(path), state(1))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"spec": {}, "model": {}, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="pickled objects") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "weights_only=True" in str(info.value)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_gives_a_one_line_error(tmp_path, keep):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, state())
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(keep * len(data))])
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and path in message
    assert "truncated or corrupt" in message or "not a zip archive" in message


@pytest.mark.parametrize("content", [random.Random(0).randbytes(3000), random.Random(1).randbytes(3000), b"\x80\x02garbage" * 50, b"hello\n" * 100])
def test_garbage_bytes_give_a_one_line_error(tmp_path, content):
    path = str(tmp_path / "ckpt.pt")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and path in str(info.value)


def test_folder_missing_file_and_foreign_checkpoints(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder.*ckpt.pt"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    old = str(tmp_path / "old.pt")
    torch.save({"config": {"res": 64}, "model": {"w": torch.zeros(1)}}, old)
    with pytest.raises(ValueError, match="older version of train.py"):
        load_checkpoint(old)
    other = str(tmp_path / "other.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match="another program"):
        load_checkpoint(other)
    torch.save(torch.zeros(3), other)
    with pytest.raises(ValueError, match="another program"):
        load_checkpoint(other)


def full_disk(monkeypatch, written=1000):
    """torch.save that writes part of the file, then finds the disk full."""
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * written)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common.torch, "save", save)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, state(0))
    with open(path, "rb") as f:
        before = f.read()
    full_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        save_checkpoint(path, state(1))
    assert info.value.errno == errno.ENOSPC
    assert "disk is full" in str(info.value) and "previous checkpoint is kept" in str(info.value)
    with open(path, "rb") as f:
        assert f.read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no .tmp left behind
    monkeypatch.undo()
    assert_same(load_checkpoint(path), state(0))


def test_full_disk_on_the_first_checkpoint_says_none_was_written(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    full_disk(monkeypatch)
    with pytest.raises(OSError, match="no checkpoint was written"):
        save_checkpoint(path, state())
    assert os.listdir(tmp_path) == []


def test_full_disk_from_torchs_own_writer_is_recognised(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError; one that says "No space left" is a full disk too."""
    def save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos: No space left on device")
    monkeypatch.setattr(common.torch, "save", save)
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(OSError, match="disk is full") as info:
        save_checkpoint(path, state())
    assert info.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_a_real_full_device_gives_the_disk_full_error(tmp_path, monkeypatch):
    """The temporary file on /dev/full, where every write fails with ENOSPC, through the real torch.save."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real_open = open

    def open_on_full(name, mode="r", *args, **kwargs):
        return real_open("/dev/full" if str(name).endswith(".tmp") else name, mode, *args, **kwargs)

    monkeypatch.setattr(common, "open", open_on_full, raising=False)
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(OSError, match="disk is full") as info:
        save_checkpoint(path, {"spec": {}, "w": torch.randn(300, 300)})  # larger than any write buffer
    assert info.value.errno == errno.ENOSPC


def test_run_script_turns_a_full_disk_into_a_one_line_exit(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    full_disk(monkeypatch)
    with pytest.raises(SystemExit) as info:
        run_script(lambda argv: save_checkpoint(path, state()))
    assert isinstance(info.value.code, str)
    assert info.value.code.startswith("error: ") and "disk is full" in info.value.code


def test_run_script_errors():
    def fail(error):
        def main(argv):
            raise error
        return main
    with pytest.raises(SystemExit, match="^error: bad flag$"):
        run_script(fail(ValueError("bad flag")))
    with pytest.raises(SystemExit, match="^error: diverged$"):
        run_script(fail(FloatingPointError("diverged")))
    with pytest.raises(OSError, match="permission"):  # other OS errors are no user error: a traceback
        run_script(fail(OSError(errno.EIO, "permission")))
    with pytest.raises(KeyError):
        run_script(fail(KeyError("bug")))
    assert run_script(lambda argv: argv, ["--x"]) == ["--x"]


# -----------------------------------------------------------------------------
# the run folder


def test_second_claim_on_a_locked_folder_is_refused(tmp_path):
    folder = str(tmp_path / "run")
    lock = claim_run_folder(folder)
    assert os.path.isdir(folder)
    with pytest.raises(FileExistsError, match="another run is using"):
        claim_run_folder(folder)
    with pytest.raises(FileExistsError, match="another run is using"):
        claim_run_folder(folder, overwrite=True)
    lock.close()
    claim_run_folder(folder).close()


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    folder = tmp_path / "run"
    for held in (["ckpt.pt"], ["log.jsonl"], ["ckpt.pt", "log.jsonl"]):
        folder.mkdir(exist_ok=True)
        for name in held:
            (folder / name).write_bytes(b"x")
        (folder / "samples_0000100.png").write_bytes(b"png")
        with pytest.raises(FileExistsError, match="already holds a run") as info:
            claim_run_folder(str(folder))
        assert all(name in str(info.value) for name in held)
        del info  # the refused claim's lock file lives as long as the exception
        assert all((folder / name).exists() for name in held)
        claim_run_folder(str(folder), overwrite=True).close()
        assert not any((folder / name).exists() for name in held)
        assert (folder / "samples_0000100.png").exists()  # only the run's checkpoint and log go


def test_resume_needs_a_checkpoint(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        claim_run_folder(str(folder), resume=True)
    (folder / "ckpt.pt").write_bytes(b"x")
    claim_run_folder(str(folder), resume=True).close()
    assert (folder / "ckpt.pt").exists() and (folder / "log.jsonl").exists()  # resuming removes nothing


def test_a_file_is_no_run_folder(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file"):
        claim_run_folder(str(path))


def test_a_refused_claim_releases_the_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="already holds a run") as refused:
        claim_run_folder(str(folder))
    assert refused.value is not None  # the exception is still referenced, as an interactive session keeps it
    claim_run_folder(str(folder), overwrite=True).close()


# -----------------------------------------------------------------------------
# settings


SETTINGS = {"a group": [("res", None, "full resolution"), ("lr", 0.5, "learning rate"), ("flag", False, "a switch"),
                        ("name", "ssd", "the method"), ("bf16", None, "autocast"), ("steps", 10, "how many")]}
TYPES = {"res": int, "bf16": bool}


def test_parse_settings_defaults_and_types():
    cfg = parse_settings(SETTINGS, TYPES, "test", [])
    assert cfg == {"res": None, "lr": 0.5, "flag": False, "name": "ssd", "bf16": None, "steps": 10}
    cfg = parse_settings(SETTINGS, TYPES, "test", ["--res", "32", "--lr=0.1", "--steps", "3", "--name", "None"])
    assert cfg["res"] == 32 and cfg["lr"] == 0.1 and cfg["steps"] == 3
    assert cfg["name"] == "None"  # a str default: the word None is a string
    assert parse_settings(SETTINGS, TYPES, "test", ["--res", "None"])["res"] is None


def test_parse_settings_none_default_refuses_other_types(capsys):
    with pytest.raises(SystemExit):
        parse_settings(SETTINGS, TYPES, "test", ["--res", "ten"])
    assert "invalid int value: 'ten'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(SETTINGS, TYPES, "test", ["--steps", "None"])  # a default that is not None


@pytest.mark.parametrize("text,value", [("True", True), ("true", True), ("1", True), ("yes", True),
                                        ("YES", True), ("False", False), ("false", False), ("0", False),
                                        ("no", False), ("No", False)])
def test_booleans(text, value):
    assert parse_settings(SETTINGS, TYPES, "test", ["--flag", text])["flag"] is value
    assert parse_settings(SETTINGS, TYPES, "test", ["--bf16", text])["bf16"] is value


@pytest.mark.parametrize("text", ["maybe", "2", "", "Tru", "None"])
def test_booleans_refuse_other_words(text, capsys):
    with pytest.raises(SystemExit):
        parse_settings(SETTINGS, TYPES, "test", ["--flag", text])
    assert "expected True/False/1/0" in capsys.readouterr().err


def test_none_default_boolean_accepts_none():
    assert parse_settings(SETTINGS, TYPES, "test", ["--bf16", "None"])["bf16"] is None
    with pytest.raises(SystemExit):
        parse_settings(SETTINGS, TYPES, "test", ["--bf16", "maybe"])


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        parse_settings(SETTINGS, TYPES, "what this does", ["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("what this does", "a group:", "--res INT", "full resolution [default: None]",
                     "--lr FLOAT", "learning rate [default: 0.5]", "--flag BOOL", "a switch [default: False]",
                     "--name STR", "the method [default: ssd]", "how many [default: 10]"):
        assert fragment in text, fragment


# -----------------------------------------------------------------------------
# generators and the device


def draws(gens):
    return ([torch.rand(5, generator=g) for g in gens.values()], torch.rand(5), torch.randn(3))


def test_rng_states_round_trip():
    gens = {"shared": torch.Generator().manual_seed(1), "local": torch.Generator().manual_seed(2),
            "noise": torch.Generator().manual_seed(3)}
    torch.manual_seed(4)
    draws(gens)  # states that are not the seeds' own
    states = rng_states(gens, torch.device("cpu"))
    assert set(states) == {"shared", "local", "noise", "default_cpu"}
    assert all(s.dtype == torch.uint8 and s.device.type == "cpu" for s in states.values())
    first = draws(gens)
    second = draws(gens)
    assert not torch.equal(first[1], second[1])
    set_rng_states(gens, states, torch.device("cpu"))
    again = draws(gens)
    assert_same(list(again[0]), list(first[0]))
    assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
    # the saved states are copies: drawing afterwards does not change them
    set_rng_states(gens, states, torch.device("cpu"))
    assert_same(list(draws(gens)[0]), list(first[0]))


def test_rng_states_survive_a_checkpoint(tmp_path):
    gens = {"local": torch.Generator().manual_seed(5)}
    torch.rand(3, generator=gens["local"])
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"spec": {}, "rng": [rng_states(gens, torch.device("cpu"))]})
    expected = torch.rand(4, generator=gens["local"]), torch.rand(4)
    set_rng_states(gens, load_checkpoint(path)["rng"][0], torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=gens["local"]), expected[0])
    assert torch.equal(torch.rand(4), expected[1])


def test_pick_device_cpu_and_auto():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_cuda_without_a_gpu():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError) as info:
            pick_device(name)
        message = str(info.value)
        assert f"--device {name}" in message and "\n" not in message
        if torch.version.cuda is None:
            assert "CPU-only build" in message
        else:
            assert "sees no GPU" in message
