"""
Train Scale Space Diffusion (or a DDPM baseline, through the same code).

    python train.py                                            # bundled Fashion-MNIST, tiny model, CPU, minutes
    python train.py --dataset celeba --data_dir PATH --res 64  # the paper's 64 px, 4-level model on one GPU
    torchrun --nproc_per_node=8 train.py --dataset celeba --data_dir PATH --res 256
    python train.py --dataset celeba --res 64 --baseline x0    # DDPM-x0 on the full ADM UNet (also: eps)
    python train.py --dataset celeba --res 64 --method msf     # the MSF baseline: base at res/2 + residual (msf.py)
    python train.py ... --resume True                          # continue from out_dir/ckpt.pt

Every setting is a key of DEFAULTS below and can be given as --key value or --key=value (booleans as True/False/1/0).
Settings left unset come from a preset: the paper's for CelebA and ImageNet (SPEC 5), a tiny model otherwise.
"""
import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import msf
from data import get_batch, load_dataset, prepare_dataset, save_grid
from degrade import SCHEDULES, ScaleSpace
from flexi_unet import UNet, paper_config, path_gflops, tiny_config
from monitor import FORWARD_IMAGES, Monitor
from ssd import batch_steps, inner_steps, network_denoiser, sample, seeded_noise, training_example, weighted_mse

DEFAULTS = dict(
    # data
    dataset="fashion_mnist",   # celeba, imagenet, folder, mnist, fashion_mnist (bundled test split)
    data_dir=None,             # None: the bundled data for fashion_mnist; required for celeba, imagenet, folder
    cache_dir=None,            # prepared uint8 arrays (default: cache/ beside the data, or ./cache)
    res=None,                  # full resolution (preset: 64 for celeba/imagenet, 32 otherwise)
    class_cond=False,          # condition on the dataset's labels, with label dropout for classifier-free guidance
    label_dropout=0.1,         # share of images trained with the null label when class_cond
    # method (SPEC 1-2)
    levels=None,               # rungs of the ladder (preset: down to 8 px, the paper's deepest: 4 at 64, 6 at 256)
    schedule="convex",         # level schedule: convex, equal, sigmoid, tanh, info
    gamma=0.5,                 # ConvexDecay gamma
    transitions=None,          # explicit transition steps instead of the schedule, e.g. 69,212,396 (info_analysis.py)
    op="bilinear",             # downsampling operator: bilinear (antialiased, the paper's) or box
    noise="linear",            # noise schedule: linear (the paper's) or cosine
    T=1000,
    parameterisation="x0",     # x0 (SSD) or eps (DDPM-eps baseline, one level only)
    min_snr=5.0,               # Min-SNR-gamma loss weight
    transition_share=None,     # share of batches on resolution-changing steps (None: the paper's, (L-1)/T)
    baseline="none",           # x0 or eps: DDPM on the full ADM UNet at one level (sets levels, flexi, parameterisation)
    method="ssd",              # ssd, or msf: the two-stage multi-scale factorisation baseline (msf.py, SPEC 6)
    msf_factor=2,              # msf: the base lives at res / msf_factor (2 or 4)
    # model (SPEC 3)
    model=None,                # paper or tiny (preset: paper for celeba/imagenet, tiny otherwise)
    flexi=True,                # False: the full-UNet ablation (every input upsampled, every block run)
    dropout=0.0,
    qk_norm=True,              # RMS-normalise attention queries and keys (flexi_unet.Attention); False: the paper's
    attention_fp32=False,      # attention logits and softmax in float32 under bf16
    # optimisation (SPEC 5)
    batch_size=None,           # global batch over all GPUs (preset: 128 at 64/128 px, 64 at 256 px, 64 tiny)
    micro_batch=None,          # images per forward pass on one GPU (gradient accumulation above it)
    lr=None,                   # AdamW learning rate (preset: 5e-5, 2e-4 tiny; the paper's 1e-4, see apply_presets)
    weight_decay=0.0,
    warmup=None,               # linear LR warm-up steps (preset: 500, 50 tiny; the paper uses none)
    grad_clip=None,            # max gradient norm, 0 = off (preset: 1; the paper uses none)
    ema_decay=0.9999,          # EMA of the weights, warmed up as min(decay, (1 + n) / (10 + n))
    max_steps=None,            # preset: 1M at 64 px, 300K at 128/256 px (SPEC 5), 500 tiny
    time_budget=0.0,           # minutes of training after compilation, checked at each log (0 = no limit)
    # system
    device="auto",             # auto, cuda, cpu
    compile=None,              # torch.compile the UNet block by block (default: on CUDA)
    cuda_graphs=None,          # replay small paths' forward and backward as CUDA graphs (default: on CUDA, no dropout)
    channels_last=False,
    bf16=None,                 # bf16 autocast (default: on CUDA); False trains in float32 (TF32 matmuls)
    seed=0,
    # output
    out_dir="out",
    wandb_project=None,        # also log to Weights & Biases under this project (pip install wandb; off by default)
    resume=False,              # continue from out_dir/ckpt.pt
    log_every=50,
    ckpt_every=5000,
    sample_every=5000,         # EMA sample grid (0 = only at the end)
    sample_n=36,
    sample_steps=100,          # respaced ancestral steps for the grids
)

# Settings a checkpoint must share with the run that resumes it: they define the model and the process.
MODEL_KEYS = ("dataset", "res", "levels", "schedule", "gamma", "op", "noise", "T", "parameterisation", "model",
              "flexi", "class_cond", "channels", "num_classes", "transitions", "method", "msf_factor", "qk_norm")
# The type of each setting whose default is None (set by a preset, or automatic); --key None keeps the default.
OPTIONAL_TYPES = dict(data_dir=str, cache_dir=str, res=int, levels=int, transitions=str, transition_share=float,
                      model=str, batch_size=int, micro_batch=int, lr=float, warmup=int, grad_clip=float,
                      max_steps=int, compile=bool, cuda_graphs=bool, bf16=bool, wandb_project=str)
# A micro-batch of at most this many output pixels per GPU replays as a CUDA graph (with --cuda_graphs). Below it the
# host is the bottleneck: on an H100 the 64 px path at batch 128 (this size) ran 10% faster as a graph and the 8 px
# path 3x faster (bench.py). Above it the GPU is, and a graph would hold the path's activations in its own pool on top
# of the allocator's cache.
GRAPH_MAX_PIXELS = 128 * 64 * 64
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU, for the MFU column


# -----------------------------------------------------------------------------
# configuration


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in DEFAULTS.items():
        kind = OPTIONAL_TYPES[key] if value is None else type(value)
        parser.add_argument(f"--{key}", type=value_parser(kind, optional=value is None), default=value)
    return apply_presets(vars(parser.parse_args(argv)))


def parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {text!r}")


def value_parser(kind, optional):
    """The argparse type of a setting: booleans as True/False/1/0, and 'None' too where that is the default."""
    parse = parse_bool if kind is bool else kind

    def parse_value(text):
        return None if optional and text == "None" else parse(text)

    parse_value.__name__ = kind.__name__  # argparse names it in its errors: "invalid int value: 'ten'"
    return parse_value


def apply_presets(cfg):
    """Fill the settings left unset: the paper's (SPEC 5) for CelebA and ImageNet, a tiny model otherwise."""
    paper = cfg["dataset"] in ("celeba", "imagenet")
    res = cfg["res"] = cfg["res"] or (64 if paper else 32)
    if cfg["baseline"] != "none":
        if cfg["baseline"] not in ("x0", "eps"):
            raise ValueError(f"--baseline {cfg['baseline']!r}: choose x0 or eps (DDPM on the full UNet) or none")
        cfg.update(levels=1, flexi=False, parameterisation=cfg["baseline"])
    # The paper trains with LR 1e-4 (5e-5 at 256 px), no warm-up and no clipping (SPEC 5). At 64 px that diverged
    # in 3 of our 4 compiled SSD runs of two minutes on an H100. With LR 5e-5, 500 warm-up steps and clipping at
    # norm 1, eager bf16 runs stayed stable for 2,000 steps, and compiled bf16 ones still did not (README, "Training
    # stability"). Pass --lr 1e-4 --warmup 0 --grad_clip 0 for the paper's settings.
    if paper:
        preset = dict(model="paper", batch_size=64 if res >= 256 else 128, lr=5e-5, warmup=500, grad_clip=1.0,
                      max_steps=1_000_000 if res <= 64 else 300_000)
    else:  # a few minutes on a laptop CPU
        preset = dict(model="tiny", batch_size=64, lr=2e-4, warmup=50, grad_clip=1.0, max_steps=500)
    preset["levels"] = max(1, int(math.log2(max(res, 8) / 8)) + 1)  # down to 8 px, the paper's deepest ladders
    for key, value in preset.items():
        if cfg[key] is None:
            cfg[key] = value
    if cfg["method"] not in ("ssd", "msf"):
        raise ValueError(f"--method {cfg['method']!r}: choose ssd or msf")
    if cfg["method"] == "msf":
        if cfg["baseline"] != "none" or cfg["parameterisation"] != "x0":
            raise ValueError("--method msf trains its own two x0-prediction DDPMs: leave out --baseline and "
                             "--parameterisation")
        cfg["levels"] = 1  # each stage is a one-level DDPM (the full-resolution one is the run's scale space)
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"--schedule {cfg['schedule']!r}: choose one of {', '.join(SCHEDULES)}")
    return cfg


def build_scale_space(cfg):
    steps = cfg["transitions"]  # a comma list from the command line, or the list a checkpoint's config holds
    if isinstance(steps, str):
        steps = [int(s) for s in steps.split(",")]
    return ScaleSpace(cfg["res"], cfg["levels"], cfg["T"], cfg["schedule"], cfg["gamma"], cfg["op"], cfg["noise"],
                      transitions=steps)


def build_model(cfg):
    """The UNet of a config (which holds the data's channels and classes once the data is known), or with
    --method msf the pair of UNets of msf.py."""
    make = {"paper": paper_config, "tiny": tiny_config}.get(cfg["model"])
    if make is None:
        raise ValueError(f"--model {cfg['model']!r}: choose paper or tiny")
    options = dict(dropout=cfg["dropout"], num_classes=cfg["num_classes"], qk_norm=cfg.get("qk_norm", False),
                   attention_fp32=cfg.get("attention_fp32", False))
    if cfg["method"] == "msf":
        return msf.MSF(*msf.msf_configs(cfg["model"], cfg["res"], cfg["channels"], cfg["msf_factor"], **options))
    return UNet(make(cfg["res"], cfg["levels"], in_channels=cfg["channels"], flexi=cfg["flexi"], **options))


# -----------------------------------------------------------------------------
# checkpoints: tensors and plain data only, written atomically, read with weights_only=True


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half checkpoint under the real name


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one first, e.g. `python train.py --out_dir "
                                f"{os.path.dirname(path) or '.'}`, or pass the path of an existing one")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_same_model(saved, cfg):
    """A checkpoint resumes only into the config it was trained with: say which settings differ."""
    diff = {k: (saved.get(k), cfg.get(k)) for k in MODEL_KEYS if saved.get(k) != cfg.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"the checkpoint was trained with another configuration ({lines}); pass the same settings, "
                         f"or another --out_dir to start a new run")


# -----------------------------------------------------------------------------
# distributed set-up: one process per GPU under torchrun, NCCL on CUDA and gloo on CPU


def setup_distributed(device):
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world, device


def all_reduce_gradients(params, world):
    """Average the gradients of the parameters on this step's path over the ranks, in one collective.

    Every rank runs the same path at every step (SPEC 2, shared level seed), so every rank has gradients for the
    same parameters: those are flattened into one buffer and all-reduced once. Blocks off the path have no
    gradient and are skipped, which is what DDP's find_unused_parameters would find out by walking the graph.
    """
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    parts = flat.split([g.numel() for g in grads])
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(parts, grads)])


# -----------------------------------------------------------------------------
# CUDA graphs: one per resolution path


@dataclass
class GraphedPath:
    """The recorded forward and backward of one path, with the tensors its replays read and write."""
    graph: torch.cuda.CUDAGraph
    inputs: list        # static copies of the example's tensors (and the labels): a replay reads these
    on_path: list       # (parameter, persistent gradient buffer) for every parameter the path trains
    loss: torch.Tensor = None

    def attach_gradients(self, zero):
        """Point the path's .grad at the buffers the graph accumulates into (the optimiser sets .grad to None
        after each step, and blocks off the path must keep None), zeroed before a step's first micro-batch."""
        if zero:
            torch._foreach_zero_([g for _, g in self.on_path])
        for p, g in self.on_path:
            p.grad = g


def with_labels(example, y):
    return example + (y,) if y is not None else example


# -----------------------------------------------------------------------------
# the training run


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto"
                              else cfg["device"])
        self.rank, self.world, self.device = setup_distributed(device)
        self.master = self.rank == 0
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # every path has static shapes: pick each conv's fastest kernel
        if cfg["cuda_graphs"] is None:
            cfg["cuda_graphs"] = cuda and cfg["dropout"] == 0  # dropout's random masks would be fixed at capture
        if cfg["cuda_graphs"] and not cuda:
            raise ValueError("--cuda_graphs True needs a CUDA device")
        if cfg["bf16"] is None:
            cfg["bf16"] = cuda
        if cfg["compile"] is None:
            cfg["compile"] = cuda
        if cfg["bf16"] and not cuda:
            raise ValueError("--bf16 True needs a CUDA device")

        self.ss = build_scale_space(cfg)  # before the data: a bad ladder fails at once, not after preparing a cache
        cfg["transitions"] = self.ss.transitions
        self.msf = cfg["method"] == "msf"
        if self.msf:  # self.ss is then the residual's full-resolution DDPM, and this the base's
            self.ss_base = msf.scale_spaces(cfg["res"], cfg["msf_factor"], cfg["T"], cfg["noise"])[0]
        self.data = self.load_data()
        if cfg["class_cond"] and not self.data.num_classes:
            raise ValueError(f"--class_cond True needs class labels and {cfg['dataset']} has none; "
                             "use --class_cond False")
        cfg.update(channels=self.data.channels, num_classes=self.data.num_classes if cfg["class_cond"] else 0)
        torch.manual_seed(cfg["seed"])  # the initial weights: the same on every rank, and set by --seed
        self.model = build_model(cfg).to(self.device)
        if cfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = build_model(cfg).to(self.device).requires_grad_(False).eval()  # eval: no dropout in samples
        self.ema.load_state_dict(self.model.state_dict())
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=cuda)
        if cfg["compile"]:
            self.model.compile_blocks()  # regional compilation: every path reuses the compiled blocks

        self.per_rank = cfg["batch_size"] // self.world
        self.micro = cfg["micro_batch"] or self.per_rank
        if cfg["batch_size"] % self.world or self.per_rank % self.micro:
            raise ValueError(f"batch_size {cfg['batch_size']} must split evenly over {self.world} ranks and into "
                             f"micro-batches of {self.micro}")
        seed = cfg["seed"]
        self.gens = dict(shared=torch.Generator().manual_seed(seed),  # same on every rank: the path of each step
                         local=torch.Generator().manual_seed(seed + 1 + self.rank),  # images, steps, flips, labels
                         noise=torch.Generator(self.device).manual_seed(seed + 10_000 + self.rank))
        self.step, self.images_seen = 0, 0
        # No autocast weight cache: a CUDA graph must not capture casts that are cached across steps.
        self.autocast = (torch.autocast("cuda", torch.bfloat16, cache_enabled=False) if cfg["bf16"]
                         else contextlib.nullcontext())
        self.graphs, self.graph_pool, self.grad_buffers = {}, None, None
        self.monitor, self.block_fields = Monitor(self.model), {}
        self.peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(self.device)),
                         None) if cuda else None
        os.makedirs(cfg["out_dir"], exist_ok=True)
        self.ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
        if cfg["resume"]:
            self.restore(load_checkpoint(self.ckpt_path))

    def load_data(self):
        cfg = self.cfg
        if self.master:  # one process prepares the cache; the others wait, then map it
            prepare_dataset(cfg["dataset"], cfg["res"], cfg["data_dir"], cfg["cache_dir"])
        if self.world > 1:
            dist.barrier()
        return load_dataset(cfg["dataset"], cfg["res"], cfg["data_dir"], cfg["cache_dir"])

    # --- one optimisation step ------------------------------------------------

    def examples(self, x0, t):
        """The forward process in float32 (it is exact): the network's inputs and targets, a tuple of tensors
        (x_t, t on the device, target, Min-SNR weight)."""
        if self.msf:  # the base at steps drawn independently of t: the two stages are separate diffusions
            t_base = torch.randint(self.cfg["T"], t.shape, generator=self.gens["local"])
            return msf.training_examples(self.model, x0, t_base, t, self.ss_base, self.ss, self.cfg["min_snr"],
                                         self.noise(x0, self.ss_base.sizes[0]), self.noise(x0, self.ss.sizes[0]))
        noise = self.noise(x0, self.ss.res(t))
        x_t, target, weight = training_example(self.ss, x0, t, self.cfg["parameterisation"], self.cfg["min_snr"], noise)
        if self.cfg["channels_last"]:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return x_t, t.to(self.device, non_blocking=True), target, weight

    def network_loss(self, example, out_res, y):
        """Per-image loss of the network on an example, under autocast: the part a CUDA graph replays."""
        if self.msf:
            return sum(msf.network_losses(self.model, example, y, self.autocast))
        x_t, t, target, weight = example
        with self.autocast:
            pred = self.model(x_t, t, out_res, y)
        return weighted_mse(pred, target, weight)

    def out_res(self, t):
        return self.ss.sizes[self.ss.target_level(t)]

    def noise(self, x0, res):
        return torch.randn(x0.shape[0], x0.shape[1], res, res, device=self.device, generator=self.gens["noise"])

    def labels_for_training(self, y):
        """Class labels with a share replaced by the null label (classifier-free guidance), or None."""
        if not self.cfg["num_classes"]:
            return None
        drop = (torch.rand(y.shape[0], generator=self.gens["local"]) < self.cfg["label_dropout"]).to(y.device)
        return torch.where(drop, torch.full_like(y, self.cfg["num_classes"]), y)

    def train_step(self, t=None):
        """One optimiser step on the global batch; returns (loss, path name, gradient norm before clipping), the
        two numbers as tensors on the device.

        t: the steps of this rank's batch (a CPU tensor sharing one path); by default drawn by the rule of SPEC 2.
        """
        cfg = self.cfg
        if t is None:
            t = batch_steps(self.ss, self.per_rank, self.gens["shared"], self.gens["local"], cfg["transition_share"])
        x0, y = get_batch(self.data, self.per_rank, self.gens["local"], self.device)
        y = self.labels_for_training(y) if y is not None else None
        path, out_res = self.path_name(t), self.out_res(t)
        total = torch.zeros((), device=self.device)
        for i in range(0, self.per_rank, self.micro):
            part = slice(i, i + self.micro)
            example, labels = self.examples(x0[part], t[part]), y[part] if y is not None else None
            total += self.backward(example, out_res, labels, path, first=i == 0)
        if self.world > 1:
            all_reduce_gradients(self.params, self.world)
        trained = [p for p in self.params if p.grad is not None]
        grad_norm = self.monitor.gradient_norm(path, trained)  # logged: the first sign of divergence
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grads_with_norm_(trained, cfg["grad_clip"], grad_norm)
        for group in self.opt.param_groups:
            group["lr"] = cfg["lr"] * min(1.0, (self.step + 1) / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]
        measure = (self.step + 1) % cfg["log_every"] == 0
        if measure:  # the block measurements of the log line: activations of this batch, size of this update
            few = slice(0, FORWARD_IMAGES)
            maxima = self.monitor.forward_maxima(lambda: self.network_loss(
                tuple(e[few] for e in example), out_res, labels[few] if labels is not None else None))
            self.monitor.before_update(trained)
        self.opt.step()
        if measure:
            self.block_fields = dict(updates=self.monitor.update_ratios(), maxima=maxima)
        self.opt.zero_grad(set_to_none=True)  # blocks off the next path keep no gradient
        self.update_ema()
        self.step += 1
        self.images_seen += cfg["batch_size"]
        return total, path, grad_norm

    def backward(self, example, out_res, y, path, first=True):
        """Forward and backward of one micro-batch, gradients accumulated; returns its share of the loss."""
        if not self.cfg["cuda_graphs"] or example[0].shape[0] * out_res ** 2 > GRAPH_MAX_PIXELS:
            loss = self.network_loss(example, out_res, y).sum() / self.per_rank
            loss.backward()
            return loss.detach()
        key = (path, example[0].shape[0])
        if key not in self.graphs:
            self.graphs[key] = self.capture(example, out_res, y)
        graph = self.graphs[key]
        graph.attach_gradients(zero=first)
        for static, value in zip(graph.inputs, with_labels(example, y)):
            static.copy_(value)
        graph.graph.replay()
        return graph.loss.clone()  # the next replay overwrites graph.loss

    def capture(self, example, out_res, y):
        """Record the forward and backward of one path as a CUDA graph (SPEC 2's one resolution pair per step
        makes every step of a path the same sequence of kernels, so the host issues it with one call).

        The gradients land in persistent buffers, which a replay accumulates into; the paths share one memory pool,
        as only one runs at a time. Warm-up runs on a side stream first (cuDNN/cuBLAS workspaces, autotuning); it
        also finds the parameters on the path: those that receive a gradient.
        """
        for p in self.params:
            p.grad = None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.network_loss(example, out_res, y).sum().backward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.grad_buffers is None:
            self.grad_buffers = [torch.zeros_like(p) for p in self.params]
            self.graph_pool = torch.cuda.graph_pool_handle()
        on_path = [(p, g) for p, g in zip(self.params, self.grad_buffers) if p.grad is not None]
        graph = GraphedPath(torch.cuda.CUDAGraph(), [x.clone() for x in with_labels(example, y)], on_path)
        graph.attach_gradients(zero=True)
        static_example, static_y = tuple(graph.inputs[:len(example)]), graph.inputs[-1] if y is not None else None
        with torch.cuda.graph(graph.graph, pool=self.graph_pool):
            loss = self.network_loss(static_example, out_res, static_y).sum() / self.per_rank
            loss.backward()
        graph.loss = loss.detach()  # keeping the autograd graph alive would pin its nodes to the capture stream
        return graph

    def drop_graphs(self):
        """Train without CUDA graphs from now on, and give their memory back."""
        self.cfg["cuda_graphs"] = False
        self.graphs.clear()
        self.opt.zero_grad(set_to_none=True)
        self.grad_buffers = self.graph_pool = None
        torch.cuda.empty_cache()

    @torch.no_grad()
    def update_ema(self):
        # Warm-up (as in TF's ExponentialMovingAverage with num_updates): a short run already averages usefully.
        decay = min(self.cfg["ema_decay"], (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), self.params, 1 - decay)

    def path_name(self, t):
        if self.msf:  # every step runs both MSF networks
            return "msf"
        return f"{self.ss.res(t)}->{self.ss.sizes[self.ss.target_level(t)]}"

    def step_flops(self, path):
        """Model FLOPs of one training step on one GPU: forward + backward, about 3x the forward (SPEC 3 counts)."""
        if self.msf:
            return 3e9 * self.model.gflops() * self.per_rank
        in_res, out_res = map(int, path.split("->"))
        return 3e9 * path_gflops(self.model, in_res, out_res) * self.per_rank

    # --- compilation -----------------------------------------------------------

    def compile_all_paths(self):
        """Run forward and backward once on every (input, output) path, so no compilation happens while timing."""
        steps = [level[0] for level in inner_steps(self.ss) if len(level)] + self.ss.transitions
        paths = {self.path_name(torch.tensor([t])): t for t in steps}  # one representative step per path
        x0, y = get_batch(self.data, self.micro, torch.Generator().manual_seed(0), self.device)
        y = y if self.cfg["num_classes"] else None  # as in training: labels of an unconditional run would recompile
        states = self.rng_states()  # leave the training randomness as it was: resumed runs match
        start = time.time()
        for name, t in paths.items():  # as in train_step: with CUDA graphs this also records each path's graph
            steps = torch.full((self.micro,), t)
            self.backward(self.examples(x0, steps), self.out_res(steps), y, name)
        self.opt.zero_grad(set_to_none=True)
        self.set_rng_states(states)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.world > 1:  # each GPU compiles its own kernels (the cache is per device): wait for the slowest
            dist.barrier()
        return list(paths), time.time() - start

    # --- checkpoints and samples ---------------------------------------------------

    def state(self):
        return dict(model=self.model.state_dict(), ema=self.ema.state_dict(), optimizer=self.opt.state_dict(),
                    step=self.step, images_seen=self.images_seen, config=dict(self.cfg),
                    rng=self.gather_rng())

    def rng_states(self):
        """This rank's generators, and the default ones that dropout draws from."""
        states = {name: g.get_state() for name, g in self.gens.items()}
        states["default_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            states["default_cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def set_rng_states(self, states):
        for name, state in states.items():  # CPU byte tensors, for CUDA generators too
            if name == "default_cpu":
                torch.set_rng_state(state)
            elif name == "default_cuda":
                torch.cuda.set_rng_state(state, self.device)
            else:
                self.gens[name].set_state(state)

    def gather_rng(self):
        """Every rank's generators (each rank draws its own images), gathered to rank 0."""
        mine = self.rng_states()
        if self.world == 1:
            return [mine]
        states = [None] * self.world
        dist.all_gather_object(states, {k: v.cpu() for k, v in mine.items()})
        return states

    def restore(self, ckpt):
        check_same_model(ckpt["config"], self.cfg)
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step, self.images_seen = ckpt["step"], ckpt["images_seen"]
        if len(ckpt["rng"]) != self.world:
            raise ValueError(f"the checkpoint was written by {len(ckpt['rng'])} processes and this run has {self.world}: "
                             f"resume with the same number of GPUs")
        self.set_rng_states(ckpt["rng"][self.rank])
        if self.master:
            print(f"resumed from {self.ckpt_path} at step {self.step} ({self.images_seen:,} images seen)")

    def save(self):
        if self.world > 1:
            self.check_ranks_in_step()
        state = self.state()  # every rank takes part in gathering the RNG states
        if self.master:
            save_checkpoint(self.ckpt_path, state)

    @torch.no_grad()
    def check_ranks_in_step(self):
        """Every rank must hold the same weights (same initial weights, paths and averaged gradients), since the
        checkpoint keeps rank 0's copy: compare a float64 sum of every parameter tensor across the ranks."""
        sums = torch.stack([p.double().sum() for p in self.params])
        extremes = torch.stack([sums, -sums])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # per tensor: the largest sum and minus the smallest
        differ = (extremes[0] != -extremes[1]).nonzero().flatten().tolist()
        if differ:
            names = [name for name, _ in self.model.named_parameters()]
            raise RuntimeError(f"the GPUs' copies of the model differ at step {self.step} ({len(differ)} tensors, "
                               f"e.g. {names[differ[0]]}), so the ranks are out of step; this is a bug: please "
                               f"report it with the command, and resume from the last checkpoint")

    @torch.no_grad()
    def save_samples(self):
        cfg = self.cfg
        labels = (torch.arange(cfg["sample_n"], device=self.device) % cfg["num_classes"]) if cfg["num_classes"] else None
        noise = seeded_noise(torch.arange(cfg["sample_n"], device=self.device))
        if self.msf:
            x = msf.sample(self.ema, self.ss_base, self.ss, cfg["sample_n"], cfg["channels"], cfg["sample_steps"],
                           noise=noise, y=labels)
        else:
            denoise = network_denoiser(self.ema, self.ss, y=labels, parameterisation=cfg["parameterisation"])
            x = sample(denoise, self.ss, cfg["sample_n"], cfg["channels"], steps=cfg["sample_steps"], noise=noise)
        path = os.path.join(cfg["out_dir"], f"samples_{self.step:07d}.png")
        save_grid(x, path)
        return path

    # --- the loop ------------------------------------------------------------------

    def fit(self):
        cfg = self.cfg
        if self.master:
            print(f"{cfg['dataset']} {cfg['res']} px, {len(self.data):,} images | {cfg['levels']} levels "
                  f"{self.ss.sizes}, transitions {self.ss.transitions} | {sum(p.numel() for p in self.params) / 1e6:.2f}M "
                  f"parameters | global batch {cfg['batch_size']} on {self.world} x {self.device.type}")
        if cfg["compile"]:
            paths, seconds = self.compile_all_paths()
            if self.master:
                print(f"compiled {len(paths)} paths ({', '.join(paths)}) in {seconds:.0f} s")
        log = open(os.path.join(cfg["out_dir"], "log.jsonl"), "a" if cfg["resume"] else "w") if self.master else None
        self.wandb = start_wandb(cfg) if self.master and cfg["wandb_project"] else None
        bar = tqdm(total=cfg["max_steps"], initial=self.step, disable=not self.master, dynamic_ncols=True)
        window = new_window()
        run_start = time.time()
        last_good = self.step if cfg["resume"] else None  # step of this run's checkpoint on disk
        while self.step < cfg["max_steps"]:
            loss, path, grad_norm = self.train_step()
            window["loss"][path] = window["loss"].get(path, 0) + loss  # summed on the device: no sync per step
            window["count"][path] = window["count"].get(path, 0) + 1
            window["grad_norm"][path] = torch.maximum(window["grad_norm"].get(path, grad_norm), grad_norm)
            if self.peak:  # only the MFU column uses it, and counting a new path takes seconds
                window["flops"] += self.step_flops(path)
            window["steps"] += 1
            done = self.step >= cfg["max_steps"]
            checkpoint = self.step % cfg["ckpt_every"] == 0 or done
            if self.step % cfg["log_every"] == 0 or checkpoint:  # no checkpoint is written before this check
                record = self.log(window, bar, log)
                self.stop_if_diverged(record, last_good)
                window = new_window()
                done = done or self.out_of_time(run_start)
            if checkpoint or done:
                self.save()
                last_good = self.step
            if self.master and ((cfg["sample_every"] and self.step % cfg["sample_every"] == 0) or done):
                bar.write(f"samples: {self.save_samples()}")
            if done:
                break
        bar.close()
        if log:
            log.close()
        if self.world > 1:
            dist.destroy_process_group()

    def stop_if_diverged(self, record, last_good):
        """Raise on a non-finite loss or weights, before a checkpoint could keep them."""
        weights_finite = bool(torch.stack([p.isfinite().all() for p in self.params]).all())
        if weights_finite and all(math.isfinite(v) for v in record["loss_per_path"].values()):
            return
        kept = (f"the last good checkpoint (step {last_good}) is kept in {self.ckpt_path}" if last_good is not None
                else "this run wrote no checkpoint yet")
        raise FloatingPointError(f"training diverged at step {self.step} (loss {record['loss']}, weights "
                                 f"{'finite' if weights_finite else 'not finite'}); {kept}. Lower --lr, "
                                 f"set --grad_clip 1, or --warmup 1000.")

    def out_of_time(self, start):
        """Whether the time budget is spent. Rank 0's clock decides: every rank must stop at the same step."""
        over = bool(self.cfg["time_budget"]) and time.time() - start > 60 * self.cfg["time_budget"]
        if self.world > 1 and self.cfg["time_budget"]:
            flag = torch.tensor(float(over), device=self.device)
            dist.broadcast(flag, 0)
            over = bool(flag)
        return over

    def log(self, window, bar, log):
        """Loss overall and per path, throughput, MFU and memory over the steps since the last log."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.time() - window["start"]
        paths = sorted(window["loss"])
        # Losses, then gradient norms (the same on every rank: they follow the all-reduce), in one tensor.
        sums = torch.stack([window["loss"][p] for p in paths] + [window["grad_norm"][p] for p in paths])
        if self.world > 1:  # the global batch's loss: every rank logs, and stops on, the same numbers
            dist.all_reduce(sums)
            sums /= self.world
        values = sums.tolist()  # the one sync per log
        per_path = {p: v / window["count"][p] for p, v in zip(paths, values)}
        steps = window["steps"]
        loss = sum(per_path[p] * window["count"][p] for p in per_path) / steps
        rate = steps * self.cfg["batch_size"] / seconds
        record = dict(step=self.step, images_seen=self.images_seen, loss=loss, loss_per_path=per_path,
                      grad_norm_per_path=dict(zip(paths, values[len(paths):])),  # the largest since the last log
                      images_per_s=rate, ms_per_step=1000 * seconds / steps, time=time.time())
        record.update(self.monitor.record(**self.block_fields))
        self.block_fields = {}
        if self.peak:
            record["mfu"] = window["flops"] / seconds / self.peak
        if self.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        remaining = (self.cfg["max_steps"] - self.step) * seconds / steps
        if self.master:
            log.write(json.dumps(json_safe(record)) + "\n")
            log.flush()
            if self.wandb:
                self.wandb.log(record, step=self.step)
            extra = f" mfu {100 * record['mfu']:.1f}%" if "mfu" in record else ""
            bar.set_postfix_str(f"loss {loss:.4f} | {rate:.0f} img/s{extra} | eta {remaining / 3600:.1f} h")
            bar.update(steps)
        return record


def new_window():
    """What the log accumulates between two log lines: per path the loss sum, step count and largest gradient
    norm (tensors on the device), the model FLOPs, the steps and the start time."""
    return dict(loss={}, count={}, grad_norm={}, flops=0.0, start=time.time(), steps=0)


def json_safe(value):
    """A log record as standard JSON: a non-finite loss (the step a run diverged) becomes null, not NaN."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def start_wandb(cfg):
    """Weights & Biases logging, an optional extra: the JSON-lines log is the record of a run."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb_project needs the wandb package: pip install wandb (or leave the flag out)") from None
    wandb.init(project=cfg["wandb_project"], config=cfg, resume="allow" if cfg["resume"] else None)
    return wandb


def main(argv=None):
    Trainer(parse_config(argv)).fit()


if __name__ == "__main__":
    main()
