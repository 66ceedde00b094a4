"""train.activation_checkpointing for a run: the policy it names, or with "auto" the least
recompute that fits the GPU at the run's micro-batch (engine.recompute.choose), measured on the
model about to train, with one of the run's own batches, before the optimizer and the EMA exist.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from engine import recompute
from engine.recompute import Recompute

# Share of the memory this process can hold (free + what its allocator already reserved) that a
# run plans for; the rest absorbs the caching allocator's fragmentation and the cuBLAS / cuDNN
# workspaces outside it.
HEADROOM = 0.92


def later_static_bytes(module: nn.Module, optimizer_name: str, copy_dtype: torch.dtype | None) -> int:
    """Memory the run allocates after the choice, besides the step's own: the optimizer's two
    moments and the EMA, each shaped like the trainable parameters (all optimizers here are
    AdamW's), and engine AdamW's low-precision copies of the Linears' parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    full = sum(p.numel() * p.element_size() for p in params)
    ema = sum(p.numel() * 4 for p in module.parameters())  # fp32 shadows of all parameters
    copies = 0
    if optimizer_name == "engine" and copy_dtype is not None:
        owned = {id(p) for p in params}
        copies = sum(p.numel() * copy_dtype.itemsize
                     for sub in module.modules() for name, p in sub.named_parameters(recurse=False)
                     if hasattr(sub, f"{name}_copy") and id(p) in owned)
    return 2 * full + ema + copies


def budget_bytes(device: torch.device, later: int, limit_bytes: int = 0) -> int:
    """What the step's activations, gradients and workspaces may take on ``device``: of what this
    process can hold (``limit_bytes`` when given, train.memory_limit_gib)."""
    free, _ = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    if limit_bytes:
        usable = min(usable, limit_bytes)
    return int(usable * HEADROOM) - torch.cuda.memory_allocated(device) - later


def limit_memory(device: torch.device, limit_gib: float) -> int:
    """Cap the caching allocator at ``limit_gib`` GiB on ``device`` (0: no cap); returns the cap
    in bytes (0 without one). Raises ValueError when the device has less."""
    if not limit_gib or device.type != "cuda":
        return 0
    total = torch.cuda.get_device_properties(device).total_memory
    limit = int(limit_gib * 2**30)
    if limit > total:
        raise ValueError(f"train.memory_limit_gib = {limit_gib} but {torch.cuda.get_device_name(device)} has "
                         f"{total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    return limit


def probe_step(loss_of, module: nn.Module, batch: dict):
    """``step(b)``: forward and backward of the first ``b`` samples of ``batch`` through
    ``loss_of(batch, generator)``, gradients released after."""
    def step(size: int) -> None:
        part = {name: value[:size] for name, value in batch.items()}
        generator = torch.Generator(part["latent"].device)
        generator.manual_seed(0)
        loss_of(part, generator).backward()
        for p in module.parameters():
            p.grad = None
    return step


def resolve(setting: int | str, module: nn.Module, device: torch.device, micro_batch: int, graphed: bool,
            loss_of, probe_batch, later: int, limit_bytes: int = 0) -> tuple[Recompute, str]:
    """(the policy applied to ``module``, a line for the log saying what and why).

    ``setting``: train.activation_checkpointing. ``graphed``: the step will be a CUDA graph (the
    recompute then does not restore the RNG state, engine.recompute). ``loss_of(batch,
    generator)``: a micro-batch's loss through ``module``. ``probe_batch(n)``: a batch of ``n``
    of the run's samples on ``device``. ``later``: bytes allocated after this (later_static_bytes).
    ``limit_bytes``: the allocator's cap (limit_memory), 0 without one.
    """
    def set_policy(policy: Recompute) -> None:
        recompute.apply(module, policy, preserve_rng_state=not graphed)

    if setting != "auto":
        policy = Recompute.parse(setting)
        set_policy(policy)
        return policy, f"recompute {policy} (train.activation_checkpointing = {setting!r})"
    if device.type != "cuda":
        set_policy(Recompute())
        return Recompute(), "recompute off (auto: no memory budget to fit on the CPU)"
    budget = budget_bytes(device, later, limit_bytes)
    batch = probe_batch(min(micro_batch, 8))
    choice = recompute.choose(module, probe_step(loss_of, module, batch), micro_batch, budget, device, set_policy)
    del batch
    torch.cuda.empty_cache()  # the probes' blocks: the step allocates its own
    return choice.policy, choice.describe()
