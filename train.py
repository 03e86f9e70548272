"""
Train Scale Space Diffusion, or one of its baselines through the same loop.

    python train.py                                            # bundled Fashion-MNIST, tiny model, CPU, minutes
    python train.py --dataset celeba --data_dir PATH --res 64  # the paper's 64 px, 4-level model on one GPU
    torchrun --nproc_per_node=8 train.py --dataset celeba --data_dir PATH --res 256
    python train.py --dataset celeba --data_dir PATH --method ddpm_x0    # or ddpm_eps, msf (methods.py)
    python train.py ... --resume True                          # continue the run in --out_dir

The file reads top to bottom: the settings, the training step, checkpoints, then main(): the data, the model
with its EMA and optimiser, and the loop. python train.py --help lists every setting with its default; those
left at None come from the preset of the model or from the device.
"""
import contextlib
import copy
import math
import os
import time
import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import methods
import msf
from common import (all_reduce_gradients, check_replicas_agree, claim_run_folder, gather, load_checkpoint,
                    parse_settings, pick_device, rng_states, run_script, save_checkpoint, set_rng_states,
                    setup_distributed)
from cuda_graphs import PathGraphs
from data import DATASETS, get_batch, load_dataset, prepare_dataset, save_grid
from degrade import SCHEDULES, ScaleSpace
from flexi_unet import paper_config, tiny_config
from monitor import FORWARD_IMAGES, Monitor, RunLog, Window, check_divergence
from ssd import seeded_noise

# The CUDA allocator grows one mapped segment instead of caching blocks of each size it has seen: the paths of a
# multi-resolution model allocate activations of very different sizes, which in a cache of fixed blocks fragment
# (more memory held than is ever in use at once, and a smaller largest batch). Read when CUDA starts; a setting of
# the user's own wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

# -----------------------------------------------------------------------------
# settings: (name, default, help). None means: filled by the preset of the model, or by the device.

SETTINGS = {
    "data": [
        ("dataset", "fashion_mnist", "celeba, imagenet, folder, mnist, or fashion_mnist (its test split is bundled)"),
        ("data_dir", None, "the dataset's files (not needed for the bundled fashion_mnist)"),
        ("cache_dir", None, "where prepared uint8 arrays go (None: cache/ beside the data, or ./cache)"),
        ("res", None, "full resolution (None: 64 for celeba and imagenet, 32 otherwise)"),
        ("class_cond", False, "condition on the dataset's labels, for classifier-free guidance"),
        ("label_dropout", 0.1, "share of images trained with the null label when class_cond"),
    ],
    "method (METHOD.md)": [
        ("method", "ssd", "ssd, ddpm_x0, ddpm_eps (the full ADM UNet at one level), or msf"),
        ("levels", None, "rungs of the resolution ladder (None: down to 8 px for ssd, 1 for the baselines)"),
        ("schedule", "convex", "level schedule: " + ", ".join(SCHEDULES)),
        ("gamma", 0.5, "ConvexDecay gamma"),
        ("transitions", None, "explicit transition steps instead of the schedule, e.g. 438,750,937"),
        ("op", "bilinear", "downsampling operator: bilinear (antialiased, the paper's) or box"),
        ("noise", "linear", "noise schedule: linear (the paper's) or cosine"),
        ("preserve_snr", False, "scale the signal at each resolution change so that the lowest frequencies keep "
                                "their SNR (METHOD.md §1; not the paper's)"),
        ("T", 1000, "diffusion steps"),
        ("min_snr", 5.0, "Min-SNR-gamma loss weight"),
        ("transition_share", None, "share of batches on resolution-changing steps (None: the paper's, (L-1)/T)"),
        ("level_shares", None, "relative shares of the other batches per level, finest first, e.g. 4,3,2,1 (None: "
                               "the paper's, each level's number of steps; METHOD.md §3)"),
        ("msf_factor", 2, "msf: the base lives at res / msf_factor (2 or 4)"),
    ],
    "model": [
        ("model", None, "paper or tiny (None: paper for celeba and imagenet, tiny otherwise)"),
        ("flexi", True, "False: the full-UNet ablation of ssd (every input upsampled, every block run)"),
        ("dropout", 0.0, "dropout in the residual blocks"),
        ("qk_norm", True, "RMS-normalise attention queries and keys (METHOD.md §8); False: the paper's attention"),
        ("attention_fp32", False, "attention logits and softmax in float32 under bf16"),
        ("upsample_transitions", False, "resolution-increasing steps run the output level's own path on x_t resized "
                                        "up (METHOD.md §5; not the paper's); False: zero skips, as the paper"),
    ],
    "optimisation (presets: METHOD.md §8)": [
        ("batch_size", None, "global batch over all GPUs (None: paper model 128, 64 at 256 px; tiny 64)"),
        ("micro_batch", None, "images per forward pass on one GPU; gradients accumulate above it (None: all)"),
        ("lr", None, "AdamW learning rate (None: paper model 5e-5, tiny 2e-4; the paper trains with 1e-4)"),
        ("weight_decay", 0.0, "AdamW weight decay"),
        ("warmup", None, "linear learning-rate warm-up steps (None: paper model 500, tiny 50; the paper: 0)"),
        ("grad_clip", None, "largest gradient norm, 0 = off (None: 1; the paper: 0)"),
        ("ema_decay", 0.9999, "EMA of the weights, warmed up as min(decay, (1 + n) / (10 + n))"),
        ("max_steps", None, "optimiser steps (None: 1M at 64 px, 300K above for the paper model; tiny 500)"),
        ("time_budget", 0.0, "minutes of training (Clock: compilation, checkpoints, snapshots and sample grids "
                             "excluded), checked at each log line; "
                             "a resumed run continues the count (0: no limit)"),
        ("snapshot_minutes", None, "save the EMA weights after these minutes of training (as time_budget counts "
                                   "them), e.g. 1,2,4,8,16: out_dir/snapshots/, for curves.py"),
        ("snapshot_steps", None, "save the EMA weights after these optimiser steps, e.g. 1050,2150,4350: equal "
                                 "compute whatever the device, or runs sharing it (out_dir/snapshots/, for curves.py)"),
    ],
    "system": [
        ("device", "auto", "auto, cuda, cuda:N or cpu"),
        ("compile", None, "torch.compile the UNet block by block (None: on CUDA)"),
        ("cuda_graphs", None, "replay small paths as CUDA graphs (None: on CUDA without dropout)"),
        ("channels_last", None, "channels-last memory layout (None: on CUDA)"),
        ("dense_skip_grads", True, "compiled decoder blocks join their skips with flexi_unet.JoinSkip; False: "
                                   "torch.cat"),
        ("per_channel_norm", True, "compiled GroupNorm from per-channel statistics (flexi_unet.GroupNorm); False: "
                                   "torch's own"),
        ("norm_row_blocks", 1, "per-channel statistics over this many blocks of rows, combined exactly"),
        ("norm_fused_grads", False, "the per-channel GroupNorm's backward written out (flexi_unet.GroupNormGrads)"),
        ("bf16", None, "bf16 autocast (None: on CUDA); False trains in float32 with TF32 matrix products"),
        ("seed", 0, "initial weights, batches, steps and noise"),
    ],
    "output": [
        ("out_dir", "out", "the run's folder: ckpt.pt, log.jsonl, sample grids"),
        ("resume", False, "continue the run in out_dir from its ckpt.pt"),
        ("overwrite", False, "start over in an out_dir that holds a run (deletes its checkpoint and log)"),
        ("wandb_project", None, "also log to Weights & Biases (pip install wandb)"),
        ("log_every", 50, "steps between log lines"),
        ("ckpt_every", 5000, "steps between checkpoints (one more at the end)"),
        ("sample_every", 5000, "steps between EMA sample grids, 0 = only at the end"),
        ("sample_n", 36, "images in a sample grid"),
        ("sample_steps", 100, "respaced sampling steps for the grids"),
    ],
}
TYPES = dict(data_dir=str, cache_dir=str, res=int, levels=int, transitions=str, transition_share=float,
             level_shares=str, model=str, batch_size=int, micro_batch=int, lr=float, warmup=int, grad_clip=float,
             max_steps=int, compile=bool, cuda_graphs=bool, bf16=bool, channels_last=bool, wandb_project=str,
             snapshot_minutes=str, snapshot_steps=str)  # the settings whose default is None
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU, for the MFU column


def parse_config(argv=None):
    """The settings of a run: parsed, filled by the presets, checked, then read-only."""
    cfg = apply_presets(parse_settings(SETTINGS, TYPES, __doc__, argv))
    check_config(cfg)
    return types.MappingProxyType(cfg)


def apply_presets(cfg):
    """Fill the settings left at None. The paper model takes METHOD.md §8's presets, the tiny one a few minutes
    on a laptop CPU; the device decides compilation, bf16 and CUDA graphs."""
    paper_data = cfg["dataset"] in ("celeba", "imagenet")
    cfg["res"] = cfg["res"] or (64 if paper_data else 32)
    cfg["model"] = cfg["model"] or ("paper" if paper_data else "tiny")
    if cfg["model"] == "paper":
        preset = dict(batch_size=64 if cfg["res"] >= 256 else 128, lr=5e-5, warmup=500, grad_clip=1.0,
                      max_steps=1_000_000 if cfg["res"] <= 64 else 300_000)
    else:
        preset = dict(batch_size=64, lr=2e-4, warmup=50, grad_clip=1.0, max_steps=500)
    depth = 3 if cfg["model"] == "tiny" else 6  # encoder levels of the model: at most one rung each
    preset["levels"] = min(depth, max(1, int(math.log2(max(cfg["res"], 8) / 8)) + 1)) if cfg["method"] == "ssd" else 1
    for key, value in preset.items():
        if cfg[key] is None:
            cfg[key] = value
    if cfg["method"] in ("ddpm_x0", "ddpm_eps"):
        cfg["flexi"] = False  # DDPM runs the full ADM UNet
    for key, kind, example in (("transitions", int, "increasing steps, e.g. 438,750,937"),
                               ("snapshot_minutes", float, "minutes, e.g. 1,2,4,8"),
                               ("snapshot_steps", int, "steps, e.g. 1050,2150,4350"),
                               ("level_shares", float, "one share per level, finest first, e.g. 4,3,2,1")):
        if isinstance(cfg[key], str):  # a comma list on the command line
            try:
                cfg[key] = [kind(part) for part in cfg[key].split(",")]
            except ValueError:
                raise ValueError(f"--{key} {cfg[key]!r}: give {example}") from None
    device = pick_device(cfg["device"])
    cfg["device"] = str(device)
    cuda = device.type == "cuda"
    for key, default in (("compile", cuda), ("bf16", cuda), ("cuda_graphs", cuda and cfg["dropout"] == 0),
                         ("channels_last", cuda)):
        if cfg[key] is None:
            cfg[key] = default
    return cfg


def check_config(cfg):
    """Refuse, naming the flag, every setting that cannot work, before any data or model is touched."""
    def need(ok, message):
        if not ok:
            raise ValueError(message)
    choices = dict(dataset=DATASETS, method=methods.NAMES, model=("paper", "tiny"), schedule=SCHEDULES,
                   op=("bilinear", "box"), noise=("linear", "cosine"))
    for key, allowed in choices.items():
        need(cfg[key] in allowed, f"--{key} {cfg[key]!r}: choose one of {', '.join(allowed)}")
    for key in ("res", "levels", "T", "batch_size", "max_steps", "log_every", "ckpt_every", "sample_n", "sample_steps",
                "norm_row_blocks"):
        need(cfg[key] >= 1, f"--{key} {cfg[key]}: must be at least 1")
    for key in ("warmup", "sample_every", "grad_clip", "weight_decay", "time_budget"):
        need(cfg[key] >= 0, f"--{key} {cfg[key]}: must be 0 or more")
    need(cfg["res"] & (cfg["res"] - 1) == 0, f"--res {cfg['res']}: not a power of two; use 32, 64, 128 or 256")
    need(math.isfinite(cfg["lr"]) and cfg["lr"] > 0, f"--lr {cfg['lr']}: must be a positive number")
    for key in ("dropout", "label_dropout", "ema_decay"):
        need(0 <= cfg[key] < 1, f"--{key} {cfg[key]}: must be in [0, 1)")
    need(cfg["transition_share"] is None or 0 <= cfg["transition_share"] <= 1, "--transition_share: must be in [0, 1]")
    shares = cfg["level_shares"]
    need(shares is None or cfg["method"] == "ssd" and len(shares) == cfg["levels"] and
         all(math.isfinite(w) and w > 0 for w in shares),
         f"--level_shares: give one positive share per level ({cfg['levels']}, finest first) of an ssd run")
    need(cfg["min_snr"] > 0 and cfg["gamma"] > 0, "--min_snr and --gamma must be positive")
    need(cfg["micro_batch"] is None or cfg["micro_batch"] >= 1, "--micro_batch: must be at least 1")
    for key in ("snapshot_minutes", "snapshot_steps"):
        need(all(m > 0 for m in cfg[key] or ()), f"--{key}: every entry must be positive")
    need(cfg["method"] in ("ssd", "msf") or cfg["levels"] == 1, f"--method {cfg['method']} trains one level")
    need(cfg["method"] != "msf" or cfg["levels"] == 1, "--method msf: each of its two stages has one level")
    need(not cfg["upsample_transitions"] or cfg["method"] == "ssd" and cfg["levels"] > 1 and cfg["flexi"],
         "--upsample_transitions True routes the steps that increase the resolution, and this run has none "
         "(it needs --method ssd with --levels 2 or more and --flexi True)")
    need(not cfg["preserve_snr"] or cfg["method"] == "ssd" and cfg["levels"] > 1,
         "--preserve_snr True scales the signal where the resolution changes, and this run has no such step "
         "(it needs --method ssd with --levels 2 or more)")
    for key in ("bf16", "cuda_graphs"):
        need(not cfg[key] or cfg["device"].startswith("cuda"), f"--{key} True needs a CUDA device")
    need(not (cfg["resume"] and cfg["overwrite"]), "--resume True and --overwrite True exclude each other")
    methods.from_spec(method_spec(cfg, channels=3, num_classes=0))  # the ladder, network and batch rule must exist


def method_spec(cfg, channels, num_classes):
    """The plain-data description of the method and its network (methods.py), which the checkpoint stores."""
    options = dict(dropout=cfg["dropout"], num_classes=num_classes, qk_norm=cfg["qk_norm"],
                   attention_fp32=cfg["attention_fp32"], upsample_transitions=cfg["upsample_transitions"])
    if cfg["method"] == "msf":
        base, residual = msf.msf_configs(cfg["model"], cfg["res"], channels, cfg["msf_factor"], **options)
        return msf.msf_spec(base, residual, cfg["T"], cfg["noise"], cfg["min_snr"])
    scale_space = {key: cfg[key] for key in ("res", "levels", "T", "schedule", "gamma", "op", "noise", "transitions",
                                             "preserve_snr")}
    scale_space["transitions"] = ScaleSpace(**scale_space).transitions  # checks the ladder, and records it
    make = paper_config if cfg["model"] == "paper" else tiny_config
    unet = make(cfg["res"], cfg["levels"], in_channels=channels, flexi=cfg["flexi"], **options)
    return methods.ssd_spec(cfg["method"], unet, scale_space, cfg["min_snr"], cfg["transition_share"],
                            cfg["level_shares"])


# -----------------------------------------------------------------------------
# the training state, and one step


@dataclass
class Run:
    """What the training step reads and changes."""
    spec: dict                 # the method and its network as plain data (methods.py): what a checkpoint stores
    method: object             # methods.py's interface: paths, examples, loss, sampler
    model: torch.nn.Module
    ema: torch.nn.Module       # the exponential moving average of the weights: what samples are drawn from
    opt: torch.optim.Optimizer
    graphs: PathGraphs | None  # the recorded paths (CUDA graphs), or None
    monitor: Monitor           # gradient norms, update sizes, activations and attention logits per block
    autocast: object
    gens: dict                 # generators: "shared" (each step's path, alike on every rank), "local" (images, steps,
                               # flips, labels), "noise" (the forward process's noise, on the device)
    device: torch.device
    rank: int = 0
    world: int = 1
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # training time so far, as Clock counts it
    block_fields: dict = field(default_factory=dict)  # the monitor's measurements for the next log line

    def __post_init__(self):
        self.params = list(self.model.parameters())

    def noise(self, shape):
        return torch.randn(shape, generator=self.gens["noise"], device=self.device)


def build_run(cfg, data, rank=0, world=1, device=torch.device("cpu")):
    """The method, the model with its EMA and optimiser, and the generators. The initial weights are set by --seed,
    alike on every rank."""
    spec = method_spec(cfg, data.channels, data.num_classes if cfg["class_cond"] else 0)
    method = methods.from_spec(spec)
    torch.manual_seed(cfg["seed"])
    model = method.build_model().to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # eval: no dropout in samples
    if cfg["compile"]:
        # regional compilation: every path reuses the compiled blocks
        model.compile_blocks(dense_skip_grads=cfg["dense_skip_grads"], per_channel_norm=cfg["per_channel_norm"],
                             norm_row_blocks=cfg["norm_row_blocks"], norm_fused_grads=cfg["norm_fused_grads"])
    seed = cfg["seed"]
    gens = dict(shared=torch.Generator().manual_seed(seed), local=torch.Generator().manual_seed(seed + 1 + rank),
                noise=torch.Generator(device).manual_seed(seed + 10_000 + rank))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            fused=device.type == "cuda")
    # No autocast weight cache: a CUDA graph must not capture casts that are reused across steps.
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cfg["bf16"], cache_enabled=False)
    return Run(spec, method, model, ema, opt, PathGraphs(list(model.parameters())) if cfg["cuda_graphs"] else None,
               Monitor(model), autocast, gens, device, rank, world)


def train_step(run, cfg, x0, t, y=None):
    """One optimiser step on this rank's batch: images x0, steps t (all on one path), labels y. Returns (loss,
    path, gradient norm); the two numbers stay on the device, so the loop never waits for the GPU."""
    loss, path, example = accumulate_gradients(run, cfg, x0, t, y)
    if run.world > 1:
        all_reduce_gradients(run.params, run.world)
    trained = [p for p in run.params if p.grad is not None]
    grad_norm = run.monitor.gradient_norm(path, trained)  # and each block's: where a spike starts
    if cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grads_with_norm_(trained, cfg["grad_clip"], grad_norm)
    for group in run.opt.param_groups:
        group["lr"] = cfg["lr"] * min(1.0, (run.step + 1) / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]
    measure = (run.step + 1) % cfg["log_every"] == 0
    if measure:  # for the log line: the activations on a few of these images, then the size of this update
        few = tuple(x[:FORWARD_IMAGES] for x in example)
        maxima = run.monitor.forward_maxima(lambda: batch_loss(run, few))
        run.monitor.before_update(trained)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)  # blocks off the next path keep no gradient
    if measure:
        run.block_fields = dict(updates=run.monitor.update_ratios(), maxima=maxima)
    update_ema(run.ema, run.params, cfg["ema_decay"], run.step)
    run.step += 1
    run.images_seen += x0.shape[0] * run.world
    return loss, path, grad_norm


def accumulate_gradients(run, cfg, x0, t, y):
    """Forward and backward of the batch in micro-batches, gradients summed; returns (the batch's mean loss, its
    path, the last micro-batch's example)."""
    path, per_rank = run.method.path_name(t), x0.shape[0]
    micro = cfg["micro_batch"] or per_rank
    total = torch.zeros((), device=x0.device)
    for i in range(0, per_rank, micro):
        part = slice(i, i + micro)
        example = run.method.example(x0[part], t[part], run.noise, None if y is None else y[part], cfg["channels_last"])
        loss_of = lambda *tensors: batch_loss(run, tensors) / per_rank
        if run.graphs is not None and run.graphs.fits(example):  # the recorded forward and backward, replayed
            loss = run.graphs.backward((path, micro), loss_of, example, first=i == 0)
        else:
            loss = loss_of(*example)
            loss.backward()
        total += loss.detach()
    return total, path, example


def batch_loss(run, example):
    """The summed per-image loss of a micro-batch, the network under autocast."""
    with run.autocast:
        return run.method.loss(run.model, example).sum()


@torch.no_grad()
def update_ema(ema, params, decay, step):
    # Warmed up as TF's ExponentialMovingAverage with num_updates: a short run already averages usefully.
    torch._foreach_lerp_(list(ema.parameters()), params, 1 - min(decay, (1 + step) / (10 + step)))


def with_null_labels(run, cfg, y):
    """Class labels with a share replaced by the null label (classifier-free guidance); None when unconditional."""
    if not run.method.num_classes:
        return None
    drop = (torch.rand(y.shape[0], generator=run.gens["local"]) < cfg["label_dropout"]).to(y.device)
    return torch.where(drop, torch.full_like(y, run.method.num_classes), y)


def compile_paths(run, cfg, data):
    """One forward and backward on every path, without an optimiser step, so that compilation, autotuning and
    graph capture happen before the clock starts. The generators are left as they were: resumed runs match."""
    states = rng_states(run.gens, run.device)
    per_rank = cfg["batch_size"] // run.world
    x0, y = get_batch(data, per_rank, torch.Generator().manual_seed(0), run.device)
    y = y if run.method.num_classes else None  # as in training: labels of an unconditional run would recompile
    start = time.time()
    for path in tqdm(run.method.paths, desc="compiling every path", disable=run.rank > 0, leave=False):
        accumulate_gradients(run, cfg, x0, run.method.path_steps(path, per_rank), y)
    run.opt.zero_grad(set_to_none=True)
    set_rng_states(run.gens, states, run.device)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    if run.world > 1:  # each GPU compiles its own kernels (the cache is per device): wait for the slowest
        dist.barrier()
    return time.time() - start


# -----------------------------------------------------------------------------
# checkpoints and sample grids


def save(run, cfg):
    """The checkpoint: the spec that rebuilds the method, the weights, the optimiser and every rank's generators."""
    if run.world > 1:
        check_replicas_agree(run.model, run.step)
    state = dict(format=1, spec=run.spec, model=run.model.state_dict(), ema=run.ema.state_dict(),
                 optimizer=run.opt.state_dict(), step=run.step, images_seen=run.images_seen,
                 train_seconds=run.train_seconds, config=dict(cfg),
                 rng=gather(rng_states(run.gens, run.device), run.world))  # each rank draws its own images
    if run.rank == 0:
        save_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), state)


def restore(run, cfg, ckpt):
    """Continue from a checkpoint of the same method and network, written by as many processes."""
    if methods.completed(ckpt["spec"]) != methods.completed(run.spec):
        old = ckpt.get("config", {})
        differ = [f"{k}: checkpoint {old[k]!r} vs now {cfg[k]!r}" for k in MODEL_SETTINGS
                  if k in old and old[k] != cfg[k]]
        raise ValueError(f"the checkpoint in {cfg['out_dir']} was trained with another configuration "
                         f"({', '.join(differ) or 'another network'}); pass its settings, or another --out_dir")
    if len(ckpt["rng"]) != run.world:
        raise ValueError(f"the checkpoint was written by {len(ckpt['rng'])} processes and this run has {run.world}: "
                         f"resume with the same number of GPUs")
    run.model.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"])
    run.opt.load_state_dict(ckpt["optimizer"])
    give_moments_their_parameters_layout(run.opt)
    run.step, run.images_seen, run.train_seconds = ckpt["step"], ckpt["images_seen"], ckpt["train_seconds"]
    set_rng_states(run.gens, ckpt["rng"][run.rank], run.device)


def give_moments_their_parameters_layout(opt):
    """Store each optimiser moment in its parameter's memory layout. A checkpoint written with the other
    --channels_last holds them in its own, and the fused update pairs parameter and moments element by element in
    memory order: mixed layouts would update each weight with another weight's moments."""
    for p, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


# The settings the spec is made of: named when a resumed run differs in them.
MODEL_SETTINGS = ("dataset", "res", "method", "levels", "schedule", "gamma", "transitions", "op", "noise",
                  "preserve_snr", "T", "min_snr", "transition_share", "level_shares", "msf_factor", "model", "flexi",
                  "dropout", "qk_norm", "attention_fp32", "upsample_transitions", "class_cond")


@torch.no_grad()
def save_samples(run, cfg):
    """A grid of EMA samples, image k from noise seed k, so that the grids of a run compare across steps."""
    n = cfg["sample_n"]
    labels = torch.arange(n, device=run.device) % run.method.num_classes if run.method.num_classes else None
    x = run.method.sample(run.ema, n, cfg["sample_steps"],
                          noise=seeded_noise(torch.arange(n, device=run.device)), y=labels)
    path = os.path.join(cfg["out_dir"], f"samples_{run.step:07d}.png")
    save_grid(x, path)
    return path


def hardware(run):
    """What the run trains on, e.g. '1 x NVIDIA H100 80GB HBM3': the clock its minutes are counted on."""
    name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else run.device.type
    return f"{run.world} x {name}"


def save_snapshot(run, cfg, minutes=None):
    """The EMA weights now, as a checkpoint that sample.py and curves.py read: named by the minutes of training it
    was taken at, or by its step (minutes None), and marked with the hardware that counted the minutes."""
    folder = os.path.join(cfg["out_dir"], "snapshots")
    os.makedirs(folder, exist_ok=True)
    name = f"ema_{minutes:g}min.pt" if minutes is not None else f"ema_{run.step}steps.pt"
    save_checkpoint(os.path.join(folder, name),
                    dict(format=1, spec=run.spec, ema=run.ema.state_dict(), step=run.step, images_seen=run.images_seen,
                         train_seconds=run.train_seconds, minutes=minutes, device=hardware(run), config=dict(cfg)))


def finished(run, cfg):
    """Whether the run has trained its steps or its minutes (the minutes are read at log lines)."""
    return run.step >= cfg["max_steps"] or bool(cfg["time_budget"]) and run.train_seconds > 60 * cfg["time_budget"]


class Clock:
    """Training time, as --time_budget and --snapshot_minutes count it: the run's seconds before this process (from
    its checkpoint) and this process's since, less its pauses. Compilation happens before the clock starts;
    checkpoints, snapshots and sample grids pause it, so a resumed run counts the minutes an unbroken one would."""

    def __init__(self, run):
        self.run, self.start = run, time.time() - run.train_seconds

    def read(self):
        """Rank 0's reading on every rank: all ranks must stop, and snapshot, at the same step."""
        seconds = time.time() - self.start
        if self.run.world > 1:
            value = torch.tensor(seconds, dtype=torch.float64, device=self.run.device)
            dist.broadcast(value, 0)
            seconds = float(value)
        return seconds

    @contextlib.contextmanager
    def paused(self):
        paused = time.time()
        yield
        self.start += time.time() - paused


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    cfg = parse_config(argv)
    rank, world, device = setup_distributed(torch.device(cfg["device"]))
    master, per_rank = rank == 0, cfg["batch_size"] // world
    if cfg["batch_size"] % world or per_rank % (cfg["micro_batch"] or per_rank):
        raise ValueError(f"--batch_size {cfg['batch_size']} must split evenly over {world} processes and into "
                         f"micro-batches of {cfg['micro_batch']}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every path has static shapes: pick each conv's fastest kernel
    lock = claim_run_folder(cfg["out_dir"], cfg["resume"], cfg["overwrite"]) if master else None

    if master:  # one process prepares the data, the others wait for it, then every process maps it
        prepare_dataset(cfg["dataset"], cfg["res"], cfg["data_dir"], cfg["cache_dir"])
    if world > 1:
        dist.barrier()
    data = load_dataset(cfg["dataset"], cfg["res"], cfg["data_dir"], cfg["cache_dir"])
    if cfg["class_cond"] and not data.num_classes:
        raise ValueError(f"--class_cond True needs class labels and {cfg['dataset']} has none; use --class_cond False")

    run = build_run(cfg, data, rank, world, device)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["resume"]:
        restore(run, cfg, load_checkpoint(ckpt_path))
    paths = {path.name: path for path in run.method.paths}
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    if master:
        shares = ", ".join(f"{p.name} {100 * p.share:.3g}%" for p in run.method.paths)  # of the batches
        print(f"{cfg['dataset']} {cfg['res']} px, {len(data):,} images | {cfg['method']}, paths {shares} | "
              f"{sum(p.numel() for p in run.params) / 1e6:.2f}M parameters | global batch {cfg['batch_size']} on "
              f"{hardware(run)}" + (f" | resuming at step {run.step}" if cfg["resume"] else ""))
    done = finished(run, cfg)  # a resumed run that has trained its steps or minutes trains no further
    if cfg["compile"] and not done:
        seconds = compile_paths(run, cfg, data)
        if master:
            print(f"compiled the {len(paths)} paths in {seconds:.0f} s")
    log = RunLog(os.path.join(cfg["out_dir"], "log.jsonl"), run.step if cfg["resume"] else None,
                 cfg["wandb_project"], dict(cfg)) if master else None
    if cfg["resume"] and done and master:
        print(f"{cfg['out_dir']} has finished its training ({run.step:,} steps, {run.train_seconds / 60:.2f} minutes); "
              "raise --max_steps or --time_budget to train it further")

    bar = tqdm(total=cfg["max_steps"], initial=run.step, desc="training", disable=not master, dynamic_ncols=True)
    window, history, kept = Window(), {}, run.step if cfg["resume"] else None
    clock = Clock(run)
    snapshots = sorted(m for m in cfg["snapshot_minutes"] or () if 60 * m > run.train_seconds)
    snapshot_steps = set(cfg["snapshot_steps"] or ())
    while not done:  # decided after a step's log line, so the last step is logged and checkpointed
        t = run.method.draw_steps(per_rank, run.gens["shared"], run.gens["local"])  # one path for the whole batch
        x0, y = get_batch(data, per_rank, run.gens["local"], device)
        loss, path, grad_norm = train_step(run, cfg, x0, t, with_null_labels(run, cfg, y))
        window.add(path, loss, grad_norm, 3e9 * run.method.gflops(run.model, paths[path]) * per_rank if peak else 0)
        bar.update(1)
        done = run.step >= cfg["max_steps"]
        checkpoint = run.step % cfg["ckpt_every"] == 0 or done
        if run.step % cfg["log_every"] == 0 or checkpoint:  # a checkpoint is written only after its log line
            record = window.record(run.step, run.images_seen, cfg["batch_size"], device, world, peak)
            record.update(run.monitor.record(**run.block_fields))
            run.block_fields = {}
            if master:
                log.write(record)
                bar.set_postfix_str(f"loss {record['loss']:.4f} | {record['images_per_s']:.0f} img/s" +
                                    (f" | mfu {100 * record['mfu']:.1f}%" if peak else ""))
            check_divergence(record, run.params, history, kept, ckpt_path)
            window = Window()
            run.train_seconds = clock.read()
            done = finished(run, cfg)
        elif run.step in snapshot_steps:
            run.train_seconds = clock.read()
        with clock.paused():
            while snapshots and run.train_seconds >= 60 * snapshots[0]:
                minutes = snapshots.pop(0)
                if master:
                    save_snapshot(run, cfg, minutes)
            if run.step in snapshot_steps and master:  # at its exact step, whatever the clock says
                save_snapshot(run, cfg)
            if checkpoint or done:
                save(run, cfg)
                kept = run.step
            if master and ((cfg["sample_every"] and run.step % cfg["sample_every"] == 0) or done):
                bar.write(f"drawing {cfg['sample_n']} EMA samples with {cfg['sample_steps']} steps")
                bar.write(f"samples: {save_samples(run, cfg)}")
    bar.close()
    if master:
        log.close()
        lock.close()
    if world > 1:
        dist.destroy_process_group()
    return run


if __name__ == "__main__":
    run_script(main)
