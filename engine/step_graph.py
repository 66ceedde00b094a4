"""The forward and backward of a training step, captured once as a CUDA graph and replayed.

Why: a PixArt-XL/2 step launches ~3,500 kernels; the GPU waits on the host between them (5.5 ms
of idle in the 130.9 ms engine step on the H200:
bench/results/h200_profile_256_b64_engine_3c3cbcd.md), and linear's cuBLASLt path costs more
host time per GEMM than the GPU time it saves unless the launches are replayed (H100: 313.6
img/s eager against 406.4 for the Triton path;
bench/results/h100_throughput_256_b64_1cd16bc_linear_{cuda,triton}.json). A replay launches the
whole forward and backward at once.

What is captured is ``fn(inputs) -> outputs``: the step's forward and backward, and whatever else
should run before the host decides on the update (the gradient norm, say). The optimizer step
stays eager after it: it is a handful of fused launches, and the training loop decides on the
host whether to apply it (non-finite skip), which a captured update could not.

    graph = StepGraph(device, params, generators=[g])
    for batch in batches:
        g.manual_seed(seed_of_this_step)
        out = graph.run(forward_backward, {"latent": batch["latent"], ...})  # dict of tensors
        optimizer.step()

The first ``warmup_steps`` calls run ``fn`` eagerly on the capture stream: Triton compilation and
autotuning, the GEMM candidate tuning of engine.ops._gemm, cuDNN's plans and the optimizer's
state must be initialised outside a capture. The next call captures and replays; every later
call copies its inputs into the captured ones and replays. Warm-up and capture run inside
``engine.ops.backend.graph_step()``: ops whose ``auto`` choice depends on launch cost pick their
replay-time kernels there (linear and mlp: the cuBLASLt path). ``fn`` must therefore

- read no device value on the host and synchronise nothing;
- draw device random numbers only from the default CUDA generator or from ``generators``
  (registered with the graph, so a replay draws what an eager call with the same seed draws);
- take the same input names, shapes and dtypes on every call (checked, with an error naming the
  input): one graph serves one shape.

Gradients: before each eager call and before the capture every parameter's ``grad`` is set to
None, so the captured backward writes the gradients into the graph's own memory; every replay
rewrites them there. From then on nothing else may replace or release them (no
``zero_grad(set_to_none=True)``; checked after each replay).

Low-precision parameter copies (engine.optim.ParameterCopy): the capture records a read of each
copy that is current then, and engine.optim.AdamW rewrites the copies in place after every step,
so each replay reads the updated weights. A parameter changed outside the optimizer after the
capture would leave its copy stale in the graph: load or edit parameters before the first call.

``outputs`` of a replay are the captured tensors themselves: read or copy them before the next
call. Only CUDA; nothing here is used on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from engine.ops.backend import graph_step

Inputs = dict[str, torch.Tensor]


def check_same_inputs(inputs: Inputs, captured: Inputs) -> None:
    """Raise ValueError naming the first input whose name set, shape, dtype or device differs from
    the captured step's."""
    if inputs.keys() != captured.keys():
        raise ValueError(f"StepGraph: this step's inputs are {sorted(inputs)}, the captured step's were "
                         f"{sorted(captured)}")
    for name, tensor in inputs.items():
        want = captured[name]
        if (tensor.shape, tensor.dtype, tensor.device) != (want.shape, want.dtype, want.device):
            raise ValueError(
                f"StepGraph: input {name!r} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, the "
                f"captured step's was {tuple(want.shape)} {want.dtype} on {want.device}: a CUDA graph replays one "
                f"shape (train.cuda_graph needs every batch of the run the same shape)")


class StepGraph:
    """A step function run eagerly ``warmup_steps`` times, then captured and replayed (module docstring)."""

    def __init__(self, device: torch.device, params: Iterable[torch.nn.Parameter], *,
                 generators: Iterable[torch.Generator] = (), warmup_steps: int = 2):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"StepGraph needs a CUDA device, got {device}")
        if warmup_steps < 1:
            raise ValueError(f"StepGraph: warmup_steps must be >= 1 (lazy initialisation cannot be captured), "
                             f"got {warmup_steps}")
        self.device, self.warmup_steps = device, warmup_steps
        self.params = [p for p in params if p.requires_grad]
        self.generators = list(generators)
        self.stream = torch.cuda.Stream(device)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: Inputs = {}
        self._outputs: dict = {}
        self._grads: list[torch.Tensor | None] = []

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def run(self, fn: Callable[[Inputs], dict], inputs: Inputs) -> dict:
        """``fn(inputs)``'s outputs: eager while warming up, then from the graph."""
        if self.graph is None and self.calls < self.warmup_steps:
            out = self._eager(fn, inputs)
        elif self.graph is None:
            out = self._capture_and_replay(fn, inputs)
        else:
            check_same_inputs(inputs, self._inputs)
            for name, tensor in inputs.items():
                self._inputs[name].copy_(tensor, non_blocking=True)
            self._replay()
            out = self._outputs
        self.calls += 1
        return out

    def _release_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _eager(self, fn, inputs: Inputs) -> dict:
        self._release_grads()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream), graph_step():
            out = fn(inputs)
        current.wait_stream(self.stream)
        return out

    def _capture_and_replay(self, fn, inputs: Inputs) -> dict:
        self._release_grads()
        # Static inputs, allocated outside the graph's pool; the caller's tensors stay theirs.
        self._inputs = {name: tensor.clone() for name, tensor in inputs.items()}
        # Capturing runs nothing but may move the generators' offsets: the replay that performs
        # this step must draw from the state the caller set.
        states = [g.get_state() for g in self.generators]
        default_state = torch.cuda.get_rng_state(self.device)
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize(self.device)
        # thread_local: a data loader thread issuing copies during the capture must not invalidate it.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"), graph_step():
            self._outputs = fn(self._inputs)
        for generator, state in zip(self.generators, states):
            generator.set_state(state)
        torch.cuda.set_rng_state(default_state, self.device)
        self.graph = graph
        self._grads = [p.grad for p in self.params]
        self._replay()
        return self._outputs

    def _replay(self) -> None:
        self.graph.replay()
        for p, grad in zip(self.params, self._grads):
            if p.grad is not grad:
                raise RuntimeError("StepGraph: a parameter's gradient was replaced or released after the step was "
                                   "captured (zero_grad(set_to_none=True)?); the graph writes the gradients into "
                                   "the tensors it captured, so they must stay the parameters' .grad")
