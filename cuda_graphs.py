"""
CUDA graphs: the training step's forward and backward on each small path (PathGraphs), and the network's forward
in sampling (ForwardGraphs), each recorded once, then replayed.

One resolution pair per batch (METHOD.md §3) makes every step of a path the same kernels on tensors of the same
shapes, so the host can issue a whole forward and backward with one call. Small paths are host-bound (the GPU
waits while Python, compiled-region guards and autograd issue some hundred kernels); a replay removes that wait.
Large micro-batches are GPU-bound and run eagerly: a graph would hold their activations a second time, in its own
memory pool. The optimiser step, clipping and the all-reduce stay outside the graph.
"""
import torch

# A micro-batch replays as a graph when its largest tensor holds at most this many values: the paper's 64 px batch
# (128 RGB images). Above it the GPU, not the host, sets the pace.
GRAPH_MAX_VALUES = 128 * 3 * 64 * 64


class PathGraphs:
    """One graph per (path, micro-batch size, whether it is the step's first micro-batch). Gradients land in
    persistent buffers, one per parameter, shared by all graphs, as is the graphs' memory pool: one graph runs at a
    time.

    Each graph takes its gradients from torch.autograd.grad as new tensors, then writes them into the buffers with
    one multi-tensor kernel: a copy for the step's first micro-batch, an addition for the others. Autograd's own
    accumulation (loss.backward() into set .grad buffers) would launch an addition per parameter, some hundred small
    kernels per replay, after zeroing the buffers with another pass."""

    def __init__(self, params):
        self.params = params
        self.graphs = {}
        self.pool = self.grad_buffers = None

    @staticmethod
    def fits(inputs):
        return max(x.numel() for x in inputs) <= GRAPH_MAX_VALUES

    def backward(self, key, loss_fn, inputs, first):
        """loss_fn(*inputs).backward() by replay, recording it on the first call for key; returns the loss.

        first: the step's first micro-batch, whose gradients replace what the buffers held; later ones add to it."""
        key = (*key, first)
        if key not in self.graphs:
            self.graphs[key] = self.capture(loss_fn, inputs, first)
        graph, static, on_path, loss = self.graphs[key]
        for target, value in zip(static, inputs):
            target.copy_(value)
        graph.replay()
        for p, buffer in on_path:  # the optimiser sets .grad to None after each step; blocks off the path keep None
            p.grad = buffer
        return loss.clone()  # the next replay overwrites the graph's loss

    def capture(self, loss_fn, inputs, first):
        """Record loss_fn's forward and backward. Two warm-up runs on a side stream come first (cuDNN and cuBLAS
        workspaces, autotuning); they also find the parameters on the path: those that receive a gradient."""
        for p in self.params:
            p.grad = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                loss_fn(*inputs).backward()
        torch.cuda.current_stream().wait_stream(side)
        if self.grad_buffers is None:
            self.grad_buffers = [torch.zeros_like(p) for p in self.params]
            self.pool = torch.cuda.graph_pool_handle()
        on_path = [(p, buffer) for p, buffer in zip(self.params, self.grad_buffers) if p.grad is not None]
        for p in self.params:
            p.grad = None
        params, buffers = (list(column) for column in zip(*on_path))
        write = torch._foreach_copy_ if first else torch._foreach_add_
        static = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = loss_fn(*static)
            write(buffers, torch.autograd.grad(loss, params))
        return graph, static, on_path, loss.detach()  # no autograd graph kept: it would pin the capture stream

    def clear(self):
        """Drop every graph and give its memory back."""
        self.graphs.clear()
        for p in self.params:
            p.grad = None
        self.pool = self.grad_buffers = None
        torch.cuda.empty_cache()


class ForwardGraphs:
    """A network's forward without gradients, one graph per input signature (shapes, output resolution, which of
    the labels and conditioning are given), recorded at its first call.

    A sampler calls the network at every step of a resolution level with the same shapes, so each level replays
    one graph: the host issues a whole forward with one call instead of some hundred kernels, which matters at the
    low resolutions, where the GPU would wait for the host. All graphs share one memory pool, since one runs at a
    time, and each output is copied out before the next replay overwrites it."""

    def __init__(self):
        self.graphs = {}
        self.pool = None

    def __call__(self, forward, x, t, out_res, y=None, cond=None):
        """forward(x, t, out_res, y, cond): the network's own, recorded for this signature at its first call. (Passed
        at each call rather than kept, so that the network and its graphs hold no reference cycle: the graphs' memory
        goes back as soon as the network is dropped.)"""
        inputs = [v for v in (x, t, y, cond) if v is not None]
        key = (out_res, y is None, cond is None, torch.is_autocast_enabled("cuda"),
               *((tuple(v.shape), v.dtype) for v in inputs))
        if key not in self.graphs:
            self.graphs[key] = self.capture(forward, x, t, out_res, y, cond)
        graph, static, out = self.graphs[key]
        for target, value in zip(static, inputs):
            target.copy_(value)
        graph.replay()
        return out.clone()

    def capture(self, forward, x, t, out_res, y, cond):
        """Two warm-up calls on a side stream (cuDNN's algorithm search, compilation), then the recording. Autocast's
        cache of bf16 weights is off: a cast cached outside the graph would be freed while the graph still reads it,
        so every cast must be recorded with the rest."""
        with torch.inference_mode(False):  # plain tensors, which replays can copy into in any grad mode
            static = [None if v is None else v.clone() for v in (x, t, y, cond)]
        autocast = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                                  cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            for _ in range(2):
                forward(static[0], static[1], out_res, static[2], static[3])
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), autocast:
            out = forward(static[0], static[1], out_res, static[2], static[3])
        return graph, [v for v in static if v is not None], out
