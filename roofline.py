"""
Where the time of a training step goes, path by path: the GPU's ceilings, the work a step must do, and the time its
kernels take by kind. bench.py --roofline True measures it and writes the table beside its own.

- Ceilings, measured in the same call: a large bf16 matrix product (TFLOP/s) and a large copy (GB/s, read + write).
- Work: the step's FLOPs (3x the forward's, flexi_unet.path_gflops) and its bytes as an unfused run moves them:
  every aten operation of an eager forward and backward reads its inputs and writes its outputs, views excluded.
  A fused run moves less, so this bounds from above the traffic a perfect implementation needs.
- Floors: the time each would take at its ceiling. A step cannot be faster than its FLOPs floor, nor than its step
  floor: the FLOPs floor plus the memory traffic that no fusion removes (memory_floor_bytes) at the copy ceiling.
- Inductor's kernels alone (bench.py --kernel_bandwidth): each generated kernel timed on its own with the bytes it
  must read and write, so their rate set against the copy ceiling says whether they are slow or only move much.
- Measured: a few profiled steps, their GPU kernels sorted by kind (KINDS), per step; "GPU idle" is the step's wall
  time less its kernels' time: the GPU waiting for the host to issue work, or for the next kernel to start (a few
  microseconds each, also within a CUDA graph, so it grows with the kernels a step launches). The host's time to
  issue a step tells the two apart: far below the wall time, the host is ahead of the GPU. The heaviest kernels
  outside the matrix products and attention are named: the memory traffic that is left to fuse or remove.
"""
import re
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from common import markdown_table

ATTENTION = r"flash|fmha|attention|sdpa"
# (kind, pattern of the CUDA kernel's name): the first match names the kind.
KINDS = [
    ("attention", ATTENTION),
    ("layout", r"nchwToNhwc|nhwcToNchw|transpose|permute"),
    ("conv and matmul", r"conv|xmma|cudnn|implicit_gemm|dgrad|wgrad|fprop|gemm|cutlass|nvjet|cublas"),
    ("optimiser and EMA", r"multi_tensor|foreach|adam|lerp"),
    ("Inductor reductions", r"^triton_(red|per)_"),
    ("Inductor pointwise", r"^triton_"),
    ("other", r""),
]


# The words of the aten operations that only move data (layout changes, and dtype casts: _to_copy). Inductor names a
# kernel after the operations fused into it (triton_poi_fused__to_copy_clone_native_group_norm_permute_view_14): it
# is a layout kernel only if nothing else is in its name (or nothing at all: triton_poi_fused_0), so a GroupNorm
# that also permutes its output counts as the GroupNorm it mostly is.
DATA_MOVEMENT = {"to", "copy", "clone", "transpose", "permute", "view", "unsafe", "unsqueeze", "squeeze", "expand",
                 "reshape", "t", "select", "slice", "split", "cat"}


def kernel_kind(name):
    """A CUDA kernel's kind: an Inductor kernel's from the operations its name lists, any other's from KINDS."""
    fused = re.fullmatch(r"triton_(poi|red|per)_fused_?(.*?)_?\d*", name)
    if fused and not re.search(ATTENTION, name, re.IGNORECASE):
        if set(filter(None, fused.group(2).split("_"))) <= DATA_MOVEMENT:
            return "layout"
        return "Inductor pointwise" if fused.group(1) == "poi" else "Inductor reductions"
    return next(kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE))


def ceilings(device, size=8192, copy_bytes=2 ** 30):
    """(matrix-product TFLOP/s, copy GB/s) of the GPU, each the best of several timed runs."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    x = torch.empty(copy_bytes // 4, device=device)
    y = torch.empty_like(x)
    a @ b  # warm-up: cuBLAS picks its kernel, the allocator settles
    y.copy_(x)
    matmul = 2 * size ** 3 / cuda_seconds(lambda: a @ b, pick=min)
    copy = 2 * copy_bytes / cuda_seconds(lambda: y.copy_(x), pick=min)  # each byte read once and written once
    return matmul / 1e12, copy / 1e9


def cuda_seconds(fn, repeats=5, iters=10, pick=statistics.median):
    """Seconds per call of fn, timed with CUDA events over `repeats` runs of `iters` calls; pick chooses among the
    runs (the median for the benchmark's figures, the minimum for a ceiling)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / iters)
    return pick(times)


class WorkCounter(TorchDispatchMode):
    """Counts the bytes every aten operation reads (its tensor inputs) and writes (its outputs), views moving none,
    and the values every GroupNorm normalises."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.norm_values = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.bytes += sum(t.nbytes for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
        if func is torch.ops.aten.native_group_norm.default:
            self.norm_values += args[0].numel()
        return out


def step_work(step, params):
    """What step() moves when every aten operation runs on its own (run it on an eager network): its bytes, the
    values its GroupNorms normalise, and how many of params it trains (those given a gradient) of how many."""
    trained = set()
    hooks = [p.register_post_accumulate_grad_hook(trained.add) for p in params]
    with WorkCounter() as counter:
        step()
    for hook in hooks:
        hook.remove()
    return dict(unfused_bytes=counter.bytes, norm_values=counter.norm_values,
                trained_values=sum(p.numel() for p in trained), values=sum(p.numel() for p in params))


# The memory traffic a training step needs however its kernels are fused, in bytes per value:
# - a GroupNorm's values in bf16, five times: the forward reads its input and writes its output (the convolution or
#   matrix product that follows reads it from memory), the backward reads its output's gradient (written by that
#   convolution's backward) and its input, and writes its input's gradient;
# - per trained fp32 parameter, AdamW's read of the value, gradient and both moments and write of three (28), and
#   the gradient norm's read of the gradient (4);
# - per parameter, trained or not, the EMA's read of both weights and write of its own.
NORM_BYTES, UPDATE_BYTES, EMA_BYTES = 5 * 2, 28 + 4, 12


def memory_floor_bytes(work):
    return (NORM_BYTES * work["norm_values"] + UPDATE_BYTES * work["trained_values"]
            + EMA_BYTES * work["values"])


# ATen's launch machinery, which names no operation: an ATen kernel's operation is the first other ATen name in its
# template arguments (direct_copy_kernel_cuda, FillFunctor, MulFunctor, sum_functor, FusedAdamMathFunctor).
ATEN_MACHINERY = {"gpu_kernel_impl", "gpu_kernel_impl_nocast", "BinaryFunctor", "AUnaryFunctor", "BUnaryFunctor",
                  "TensorListMetadata", "ReduceOp", "func_wrapper_t"}


def short_name(name, width=70):
    """A kernel's name without its return type, template arguments and parameters: what tells kernels apart. An ATen
    kernel keeps the operation it runs, in brackets."""
    name = re.sub(r"^void |\(anonymous namespace\)::", "", name)
    short = re.split(r"[<(]", name, maxsplit=1)[0][:width] or name[:width]
    if short.startswith("at::native::"):
        operations = re.findall(r"at::native::(?:\w+::)*(\w+)", name)[1:]  # [0]: the kernel's own name
        operation = next((o for o in operations if o not in ATEN_MACHINERY), None)
        if operation:
            short = f"{short} [{operation}]"
    return short


def kernel_times(step, steps=3, heaviest=8):
    """step()'s GPU time per step: milliseconds of its CUDA kernels by kind ("kinds"), its wall time ("wall_ms"),
    the host's time to issue it ("host_ms": as long as the wall time when the GPU waits for the host, or when the
    host waits for the GPU's queue to drain), the kernels it launches ("launches") and the `heaviest` kernels outside
    the matrix products and attention as (name, kind, ms per step)."""
    step()
    torch.cuda.synchronize()
    issued = time.perf_counter()
    for _ in range(steps):
        step()
    host_ms = (time.perf_counter() - issued) / steps * 1000
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    times, named, launches = defaultdict(float), defaultdict(float), 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms, kind = event.device_time_total / 1000 / steps, kernel_kind(event.name)  # microseconds -> ms
            times[kind] += ms
            named[short_name(event.name), kind] += ms
            launches += 1
    memory_bound = sorted(((name, kind, ms) for (name, kind), ms in named.items()
                           if kind not in ("conv and matmul", "attention")), key=lambda k: -k[2])
    return dict(kinds=dict(times), wall_ms=start.elapsed_time(end) / steps, host_ms=host_ms,
                launches=launches / steps, heaviest=memory_bound[:heaviest])


def inductor_kernels(step, copy_gbs, heaviest=8):
    """The Inductor kernels one step launches, each timed alone, with the bytes it must read and write, summed by
    kernel_bandwidth. Needs torch._inductor.config.profile_bandwidth set before the step is compiled: Inductor then
    times each kernel at its first launch (a cold L2 cache) and afterwards lists the kernel and its bytes without
    running it, so the outputs of such a step are meaningless and only its list counts."""
    from torch._inductor.runtime import triton_heuristics
    step()  # each kernel's first launch: timed
    torch.cuda.synchronize()
    triton_heuristics.collected_calls.clear()
    step()
    torch.cuda.synchronize()
    return kernel_bandwidth(triton_heuristics.collected_calls, copy_gbs, heaviest)


def kernel_bandwidth(calls, copy_gbs, heaviest=8):
    """Totals of kernel launches given as (ms, GB, GB/s, name): launches, ms, GB, their rate and its share of the
    copy ceiling, the time the bytes would take at that ceiling, and the `heaviest` kernels by total time as
    (name, launches, ms, GB/s)."""
    named = defaultdict(lambda: [0, 0.0, 0.0])
    for ms, gb, _, name in calls:
        named[name][0] += 1
        named[name][1] += ms
        named[name][2] += gb
    ms, gb = sum(c[0] for c in calls), sum(c[1] for c in calls)
    top = sorted(named.items(), key=lambda kv: -kv[1][1])[:heaviest]
    return dict(launches=len(calls), ms=ms, gb=gb, gbs=1e3 * gb / ms, copy_share=1e3 * gb / ms / copy_gbs,
                ceiling_ms=1e3 * gb / copy_gbs, heaviest=[[name, n, t, 1e3 * g / t] for name, (n, t, g) in top])


def bandwidth_markdown(variant, rows):
    """bench.py --kernel_bandwidth's table: rows of kernel_bandwidth with their "path"."""
    header = [f"{variant} path", "Inductor kernels/step", "GB/step", "ms alone", "GB/s", "of the copy ceiling",
              "ms at the copy ceiling"]
    cells = [[r["path"], f"{r['launches']:,}", f"{r['gb']:.1f}", f"{r['ms']:.1f}", f"{r['gbs']:,.0f}",
              f"{100 * r['copy_share']:.0f}%", f"{r['ceiling_ms']:.1f}"] for r in rows]
    lines = ["Inductor's kernels of one training step, each timed alone (cold L2) with the bytes it must read and "
             "write:", "", markdown_table(header, cells), "", "The heaviest, ms per step (launches, GB/s):"]
    lines += [f"- {r['path']}: " + "; ".join(f"{name} {ms:.2f} ({n}, {gbs:,.0f})" for name, n, ms, gbs in r["heaviest"])
              for r in rows]
    return "\n".join(lines)


def row(path, flops, work, measured, ceiling):
    """One path's line of the table: its work (step_work) and floors, the measured time by kind (kernel_times, ms
    per step) and its heaviest memory-bound kernels."""
    matmul_tflops, copy_gbs = ceiling
    kernels = measured["kinds"]
    busy = sum(kernels.values())
    matrix = kernels.get("conv and matmul", 0.0) + kernels.get("attention", 0.0)
    flops_floor_ms = flops / matmul_tflops / 1e9
    return dict(path=path, gflop=flops / 1e9, gb=work["unfused_bytes"] / 1e9, flops_floor_ms=flops_floor_ms,
                unfused_ms=work["unfused_bytes"] / copy_gbs / 1e6,
                step_floor_ms=flops_floor_ms + memory_floor_bytes(work) / copy_gbs / 1e6,
                wall_ms=measured["wall_ms"], kernels_ms=busy, idle_ms=max(0.0, measured["wall_ms"] - busy),
                host_ms=measured["host_ms"], launches=measured["launches"],
                matrix_tflops=flops / matrix / 1e9 if matrix else 0.0, kinds=kernels,
                heaviest=[list(k) for k in measured["heaviest"]])


def heaviest_text(heaviest, scale=1.0):
    """(name, kind, ms) triples as text; scale 1e-3 gives seconds."""
    return [f"{name} ({kind}) {ms * scale:.2f}" for name, kind, ms in heaviest]


def markdown(variant, rows, ceiling):
    kinds = [kind for kind, _ in KINDS]
    header = [f"{variant} path", "GFLOP/step", "GB/step unfused", "FLOPs floor ms", "unfused bytes ms",
              "step floor ms", "measured ms", "conv+matmul+attention TFLOP/s", *(f"{k} ms" for k in kinds),
              "GPU idle ms", "kernels/step", "host ms"]
    cells = [[r["path"], f"{r['gflop']:,.0f}", f"{r['gb']:.1f}", f"{r['flops_floor_ms']:.1f}",
              f"{r['unfused_ms']:.1f}", f"{r['step_floor_ms']:.1f}", f"{r['wall_ms']:.1f}",
              f"{r['matrix_tflops']:.0f}", *(f"{r['kinds'].get(k, 0.0):.1f}" for k in kinds), f"{r['idle_ms']:.1f}",
              f"{r['launches']:,.0f}", f"{r['host_ms']:.1f}"] for r in rows]
    lines = [f"Ceilings measured in this run: bf16 matrix product {ceiling[0]:.0f} TFLOP/s, copy {ceiling[1]:.0f} GB/s.",
             "The step floor: the FLOPs floor, plus each GroupNorm's input and output once forward and its gradients "
             "once backward, AdamW, the gradient norm and the EMA, at the copy ceiling (roofline.memory_floor_bytes).",
             "", markdown_table(header, cells),
             "", "The heaviest kernels outside the matrix products and attention, ms per step:"]
    lines += [f"- {r['path']}: " + "; ".join(heaviest_text(r["heaviest"])) for r in rows]
    return "\n".join(lines)
