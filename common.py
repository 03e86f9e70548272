"""
What train.py, sample.py and bench.py share: settings on the command line, one-line errors for the user, the
device and the process group, the generators of a run, checkpoints written atomically and read safely, and the
Markdown tables the measuring scripts write.

Checkpoints hold tensors and plain data only ({"format": 1, "spec": the method's spec (methods.py), "ema": ...,
"model": ..., ...}), are read with torch.load(weights_only=True), and are written to a temporary file that is
flushed to disk before it replaces the old one: a crash, a kill or a full disk never leaves a broken checkpoint.
"""
import argparse
import errno
import fcntl
import os
import pickle
import zipfile

import torch
import torch.distributed as dist

CHECKPOINT_FORMAT = 1
# The errors that mean bad input: scripts print them as one line, "error: ...", with no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError)


def run_script(main, argv=None):
    """Run a script's main(argv); bad input ends in one line and exit code 1, programming errors in a traceback."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise SystemExit(f"error: {e}") from None
        raise


def parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {text!r}")


def parse_settings(settings, types, description, argv=None):
    """A dict of settings from the command line: settings = {group title: [(name, default, help)]}, each a flag
    --name VALUE (or --name=VALUE), booleans as True/False/1/0. A default of None (filled later, by a preset or the
    device) takes its type from types[name] and accepts the word None."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, group in settings.items():
        options = parser.add_argument_group(title)
        for name, default, text in group:
            kind = types[name] if default is None else type(default)
            options.add_argument(f"--{name}", type=value_parser(kind, optional=default is None), default=default,
                                 metavar=kind.__name__.upper(), help=f"{text} [default: {default}]")
    return vars(parser.parse_args(argv))


def value_parser(kind, optional):
    parse = parse_bool if kind is bool else kind

    def parse_value(text):
        return None if optional and text == "None" else parse(text)

    parse_value.__name__ = kind.__name__  # argparse names it in its errors: "invalid int value: 'ten'"
    return parse_value


# -----------------------------------------------------------------------------
# device and processes


def pick_device(name="auto"):
    """auto: the GPU if there is one; cuda or cuda:N must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise ValueError(f"--device {name}: this PyTorch ({torch.__version__}) is a CPU-only build; on a machine "
                             f"with an NVIDIA GPU install a CUDA build (see pytorch.org/get-started), or use --device cpu")
        raise ValueError(f"--device {name}: PyTorch was built with CUDA {torch.version.cuda} but sees no GPU (check "
                         f"the driver with nvidia-smi), or use --device cpu")
    return device


def setup_distributed(device):
    """(rank, world size, device): one process per GPU under torchrun (NCCL), gloo on the CPU; (0, 1, device)
    without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return rank, world, device


def all_reduce_gradients(params, world):
    """Average the gradients over the ranks, in one collective. Every rank runs the same resolution path at every
    step, so the same parameters have gradients everywhere; blocks off the path have none and are skipped, as
    DDP's find_unused_parameters would find by walking the autograd graph."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


@torch.no_grad()
def check_replicas_agree(model, step):
    """Every rank must hold the same weights, since a checkpoint keeps rank 0's copy: compare a float64 sum of
    every parameter tensor across the ranks."""
    sums = torch.stack([p.double().sum() for p in model.parameters()])
    extremes = torch.stack([sums, -sums])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # per tensor: the largest sum and minus the smallest
    differ = (extremes[0] != -extremes[1]).nonzero().flatten().tolist()
    if differ:
        names = [name for name, _ in model.named_parameters()]
        raise RuntimeError(f"the GPUs' copies of the model differ at step {step} ({len(differ)} tensors, e.g. "
                           f"{names[differ[0]]}), so the ranks are out of step; this is a bug: please report it with "
                           f"the command, and resume from the last checkpoint")


# -----------------------------------------------------------------------------
# generators: a run's randomness, saved in its checkpoints so that a resumed run continues exactly


def rng_states(gens, device):
    """The run's generators, and the default ones that dropout draws from, as CPU byte tensors."""
    states = {name: g.get_state().cpu() for name, g in gens.items()}
    states["default_cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        states["default_cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(gens, states, device):
    for name, state in states.items():
        if name == "default_cpu":
            torch.set_rng_state(state)
        elif name == "default_cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            gens[name].set_state(state)


def gather(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (plain data and CPU tensors)."""
    if world == 1:
        return [obj]
    objects = [None] * world
    dist.all_gather_object(objects, obj)
    return objects


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, state):
    """Write state to path atomically: a temporary file, flushed and synced, then renamed over the old one.

    On a full disk the temporary file is removed, the previous checkpoint stays, and the error says so."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)  # and so is the rename
        finally:
            os.close(folder)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            kept = "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was written"
            raise OSError(errno.ENOSPC, f"the disk is full: could not write {path} ({kept}); free some space, then "
                                        f"resume with --resume True") from None
        raise


def load_checkpoint(path):
    """A checkpoint of this project, read safely; a one-line error says what is wrong with it."""
    return check_checkpoint(read_checkpoint(path), path)


def read_checkpoint(path):
    """The tensors and plain data of a checkpoint file, of this project or another (weights_only=True)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; pass the checkpoint file in it, e.g. "
                                f"{os.path.join(path, 'ckpt.pt')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return read_tensors_file(path, "checkpoint")


def check_checkpoint(ckpt, path):
    """ckpt, if it is in this project's format: a dict with the spec of its method."""
    if not isinstance(ckpt, dict) or "spec" not in ckpt:
        what = "an older version of train.py" if isinstance(ckpt, dict) and "config" in ckpt else "another program"
        raise ValueError(f"{path} was written by {what}: it has no model spec (checkpoint format "
                         f"{CHECKPOINT_FORMAT}); retrain it with this version of train.py")
    return ckpt


def read_tensors_file(path, what="file"):
    """torch.load with weights_only=True, with a one-line error for a truncated, corrupt or unsafe file."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        with open(path, "rb") as f:
            started = f.read(4) == b"PK\x03\x04"  # the start of one, without its end
        raise ValueError(f"{path} is truncated or corrupt, not a readable {what} (a zip archive without its "
                         f"directory)" if started else f"{path} is not a {what} written by torch.save (it is not a "
                         f"zip archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds pickled objects other than tensors and plain data; it is refused, since "
                         f"loading those can run code (this project reads {what}s with weights_only=True)") from None
    except (RuntimeError, EOFError, KeyError, IndexError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as e:
        detail = " ".join(str(e).split())[:120]
        raise ValueError(f"{path} is truncated or corrupt, not a readable {what} ({type(e).__name__}: "
                         f"{detail})") from None


# -----------------------------------------------------------------------------
# one run per folder


def claim_run_folder(folder, resume=False, overwrite=False):
    """Lock folder/.lock for the life of the process, so that a second run on the same folder stops with a
    message instead of writing the same files; and refuse to start over a run that is there unless told to
    (resume or overwrite). Returns the open lock file: keep it referenced."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"--out_dir {folder} is a file; give a folder for the run")
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise FileExistsError(f"another run is using {folder} right now; wait for it to finish, or pass another "
                              f"--out_dir") from None
    ckpt = os.path.join(folder, "ckpt.pt")
    held = [name for name in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(folder, name))]
    if resume and not os.path.exists(ckpt):
        lock.close()
        raise FileNotFoundError(f"--resume True: there is no checkpoint at {ckpt} to continue; leave out --resume "
                                f"to start a new run there, or point --out_dir at the run's folder")
    if held and not (resume or overwrite):
        lock.close()
        raise FileExistsError(f"{folder} already holds a run ({', '.join(held)}); pass --resume True to continue it, "
                              f"--overwrite True to start over, or another --out_dir")
    if overwrite:
        for name in held:
            os.remove(os.path.join(folder, name))
    return lock


# -----------------------------------------------------------------------------
# results as Markdown


def markdown_table(header, rows):
    """A Markdown table: the column names, then one list of cells per row (each cell already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
