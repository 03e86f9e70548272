"""
CUDA graphs for the training step: the forward and backward of each small path recorded once, then replayed.

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
    """One graph per (path, micro-batch size). Gradients land in persistent buffers that replays accumulate into;
    all graphs share one memory pool, since only one runs at a time."""

    def __init__(self, params):
        self.params = params
        self.graphs = {}
        self.pool = self.grad_buffers = None

    @staticmethod
    def fits(inputs):
        return max(x.numel() for x in inputs) <= GRAPH_MAX_VALUES

    def backward(self, key, loss_fn, inputs, first):
        """loss_fn(*inputs).backward() by replay, recording it on the first call for key; returns the loss.

        first: the step's first micro-batch, whose replay starts from zero gradients."""
        if key not in self.graphs:
            self.graphs[key] = self.capture(loss_fn, inputs)
        graph, static, on_path, loss = self.graphs[key]
        if first:
            torch._foreach_zero_([buffer for _, buffer in on_path])
        for p, buffer in on_path:  # the optimiser sets .grad to None after each step; blocks off the path keep None
            p.grad = buffer
        for target, value in zip(static, inputs):
            target.copy_(value)
        graph.replay()
        return loss.clone()  # the next replay overwrites the graph's loss

    def capture(self, loss_fn, inputs):
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
        torch._foreach_zero_([buffer for _, buffer in on_path])
        for p, buffer in on_path:
            p.grad = buffer
        static = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = loss_fn(*static)
            loss.backward()
        return graph, static, on_path, loss.detach()  # no autograd graph kept: it would pin the capture stream

    def clear(self):
        """Drop every graph and give its memory back."""
        self.graphs.clear()
        for p in self.params:
            p.grad = None
        self.pool = self.grad_buffers = None
        torch.cuda.empty_cache()
