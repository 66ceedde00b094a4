"""Activation recompute: which parts of a model's blocks give back their activations in the
forward and compute them again in the backward, and the least of it that fits a memory budget.

A policy (``Recompute``) names the parts of each block that are recomputed, on every k-th block
(blocks 0, k, 2k, ...):

    off             nothing recomputed: the fastest step, the most memory
    block           whole blocks (only their inputs are kept)
    mlp             the blocks' ``mlp`` submodule (any direct submodule of a block by its name)
    mlp,attn/2      two submodules, on every second block

Recompute trades time for memory: a recomputed part runs its forward twice. Its cost here is the
share of the blocks' parameters that run again (``Recompute.cost``): the parts are token-wise
GEMMs whose FLOPs follow their parameter counts, up to attention's score and value products.

``choose`` picks, among all policies over the blocks' parts, the cheapest whose predicted peak
fits a budget. The prediction comes from measurement (``measure``): the memory of a forward and
backward at two small micro-batches, once without recompute, once with each part (and whole
blocks) recomputed on every block, extrapolated linearly to the run's micro-batch and scaled by
the number of blocks a policy covers. The chosen policy is measured once more before it is
accepted. On CUDA the measure is the allocator's peak above what was allocated before; on the
CPU (no allocator statistics) it is the bytes of the tensors autograd saves for the backward,
which is what recompute changes.

Recompute runs through torch.utils.checkpoint (non-reentrant). With ``preserve_rng_state=False``
it does not restore the random state before recomputing, which a CUDA-graph capture needs (the
RNG state cannot be read during a capture): correct for blocks that draw no random numbers in
training, as the engine's families' blocks (no dropout).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from engine.parallel import blocks_of

WHOLE_BLOCK = "block"
_POLICY = re.compile(r"(?P<parts>[A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*)(/(?P<every>[1-9][0-9]*))?")


def block_parts(model: nn.Module) -> tuple[str, ...]:
    """The names of the direct submodules with parameters that every block has (for PixArt:
    attn, cross_attn, mlp): what a policy can name besides ``block``. A block class that calls
    some of its submodules' forward and only reads the others' parameters (MicroDiT's norms,
    whose weights go into the fused norm ops) lists the called ones in ``recompute_parts``:
    recomputing a module whose forward never runs would save nothing."""
    blocks = blocks_of(model)
    declared = getattr(blocks[0], "recompute_parts", None)
    if declared is not None:
        return tuple(declared)
    names = [name for name, child in blocks[0].named_children() if any(True for _ in child.parameters())]
    return tuple(name for name in names if all(isinstance(getattr(b, name, None), nn.Module) for b in blocks))


@dataclass(frozen=True)
class Recompute:
    """What each chosen block recomputes: ``parts`` (empty: nothing; ("block",): the whole block;
    else submodule names) on blocks 0, every, 2 every, ..."""

    parts: tuple[str, ...] = ()
    every: int = 1

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"recompute: every must be >= 1, got {self.every}")
        if WHOLE_BLOCK in self.parts and len(self.parts) > 1:
            raise ValueError(f"recompute: {WHOLE_BLOCK!r} already covers every part, got {list(self.parts)}")

    @property
    def off(self) -> bool:
        return not self.parts

    def __str__(self) -> str:
        if self.off:
            return "off"
        return ",".join(self.parts) + (f"/{self.every}" if self.every > 1 else "")

    @classmethod
    def parse(cls, value: int | str) -> Recompute:
        """An integer k: whole blocks, every k-th (0: off); "off"; "PART[,PART...][/k]" with PART a
        block submodule's name or "block"."""
        if isinstance(value, bool):
            raise ValueError(f"recompute policy {value!r}: expected an integer or a string like 'mlp/2'")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"recompute policy {value}: expected an integer >= 0 (0 = off)")
            return cls() if value == 0 else cls((WHOLE_BLOCK,), value)
        text = str(value).strip()
        if text == "off":
            return cls()
        match = _POLICY.fullmatch(text)
        if match is None:
            raise ValueError(f"recompute policy {value!r}: expected 'off', 'auto', an integer, or parts like "
                             f"'block', 'mlp', 'mlp,attn/2'")
        parts = tuple(dict.fromkeys(match["parts"].split(",")))
        return cls(parts, int(match["every"] or 1))

    def chosen_blocks(self, depth: int) -> list[int]:
        return [] if self.off else list(range(0, depth, self.every))

    def check(self, model: nn.Module) -> None:
        """Raise ValueError naming a part the model's blocks do not have."""
        known = block_parts(model)
        unknown = [p for p in self.parts if p != WHOLE_BLOCK and p not in known]
        if unknown:
            raise ValueError(f"recompute policy {str(self)!r}: {type(model).__name__}'s blocks have no part "
                             f"{unknown}; parts: {[WHOLE_BLOCK, *known]}")

    def cost(self, model: nn.Module) -> float:
        """The share of the blocks' parameters whose forward runs a second time (0 off, 1 all
        blocks whole)."""
        blocks = blocks_of(model)
        total = sum(p.numel() for p in blocks.parameters())
        again = 0
        for index in self.chosen_blocks(len(blocks)):
            block = blocks[index]
            modules = [block] if WHOLE_BLOCK in self.parts else [getattr(block, p) for p in self.parts]
            again += sum(p.numel() for m in modules for p in m.parameters())
        return again / total if total else 0.0


def apply(model: nn.Module, policy: Recompute, preserve_rng_state: bool = True) -> nn.Module:
    """Recompute ``policy``'s parts in the backward (any earlier policy removed first). Parameter
    names do not change: checkpoints load the same with or without recompute."""
    remove(model)
    if policy.off:
        return model
    policy.check(model)
    blocks = blocks_of(model)
    for index in policy.chosen_blocks(len(blocks)):
        block = blocks[index]
        targets = [block] if WHOLE_BLOCK in policy.parts else [getattr(block, p) for p in policy.parts]
        for module in targets:
            # the forward in place now (the class's, or one an instance attribute set) comes back on remove
            module._engine_recompute_original = module.__dict__.get("forward")
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False,
                                               preserve_rng_state=preserve_rng_state)
    model._engine_recompute = policy
    return model


def remove(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if "_engine_recompute_original" not in module.__dict__:
            continue
        original = module.__dict__.pop("_engine_recompute_original")
        if original is None:
            del module.forward  # the class's forward again
        else:
            module.forward = original
    model.__dict__.pop("_engine_recompute", None)
    return model


def applied(model: nn.Module) -> Recompute:
    """The policy ``apply`` left on ``model`` (off when none)."""
    return model.__dict__.get("_engine_recompute", Recompute())


# --------------------------------------------------------------------------------- measurement

def _saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of the distinct storages autograd saves for the backward during ``step``'s forward
    (``step`` runs forward and backward; its backward frees them again)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(seen.values())


def measure(step: Callable[[int], None], batch: int, device: torch.device) -> int:
    """Memory of ``step(batch)`` (a forward and backward of that micro-batch): on CUDA the
    allocator's peak above what was allocated before; on the CPU the bytes saved for the backward."""
    if device.type != "cuda":
        return _saved_bytes(lambda: step(batch))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(batch)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class Choice:
    """What ``choose`` decided and why."""

    policy: Recompute
    predicted_bytes: int   # at the run's micro-batch
    measured_bytes: int    # the chosen policy, measured at the larger probe batch and extrapolated
    budget_bytes: int
    cost: float            # Recompute.cost
    fits: bool             # False: even the most recompute does not fit; the most is returned

    def describe(self) -> str:
        gib = 2**30
        verdict = "fits" if self.fits else "does NOT fit even with the most recompute"
        return (f"recompute {self.policy} (auto: {self.cost:.0%} of the blocks' forward again; predicted "
                f"{self.predicted_bytes / gib:.1f} GiB of a {self.budget_bytes / gib:.1f} GiB budget, {verdict})")


def candidates(model: nn.Module) -> list[Recompute]:
    """Every policy over non-empty sets of the blocks' parts and whole blocks, on every k-th block
    for the k that give distinct block counts, plus off."""
    depth = len(blocks_of(model))
    parts = block_parts(model)
    sets = [combo for size in range(1, len(parts) + 1) for combo in itertools.combinations(parts, size)]
    sets.append((WHOLE_BLOCK,))
    everies, seen = [], set()
    for every in range(1, depth + 1):
        count = math.ceil(depth / every)
        if count not in seen:
            seen.add(count)
            everies.append(every)
    return [Recompute()] + [Recompute(s, every) for s in sets for every in everies]


def choose(model: nn.Module, step: Callable[[int], None], micro_batch: int, budget_bytes: int,
           device: torch.device, set_policy: Callable[[Recompute], None] | None = None) -> Choice:
    """The cheapest policy (``Recompute.cost``) whose memory at ``micro_batch``, predicted from
    measurements at two small batches (module docstring), is at most ``budget_bytes``.

    ``step(b)`` runs one forward and backward of a micro-batch of ``b`` samples with whatever
    policy is applied and leaves no gradients behind; ``set_policy`` applies a policy (default:
    ``apply``). The model is left with the chosen policy applied.
    """
    set_policy = set_policy or (lambda policy: apply(model, policy))
    large = max(1, min(micro_batch, 8))
    small = max(1, large // 2)
    depth = len(blocks_of(model))

    def at_run_batch(policy: Recompute) -> tuple[int, int]:
        set_policy(policy)
        low = measure(step, small, device)
        high = measure(step, large, device) if large != small else low
        slope = (high - low) / (large - small) if large != small else high / large
        return int(high + slope * (micro_batch - large)), high

    measured = {Recompute(): at_run_batch(Recompute())}
    singles = [*((p,) for p in block_parts(model)), (WHOLE_BLOCK,)]
    for parts in singles:
        measured[Recompute(parts)] = at_run_batch(Recompute(parts))
    base = measured[Recompute()][0]

    def predicted(policy: Recompute) -> int:
        if policy in measured:
            return measured[policy][0]
        share = len(policy.chosen_blocks(depth)) / depth
        saved = sum(base - measured[Recompute((p,))][0] for p in policy.parts)
        return int(base - share * saved)

    ranked = sorted(candidates(model), key=lambda policy: (policy.cost(model), predicted(policy)))
    for policy in ranked:
        if predicted(policy) > budget_bytes:
            continue
        if policy not in measured:  # a combination: measured before it is trusted
            measured[policy] = at_run_batch(policy)
            if measured[policy][0] > budget_bytes:
                continue
        set_policy(policy)
        return Choice(policy, measured[policy][0], measured[policy][1], budget_bytes, policy.cost(model), True)
    most = Recompute((WHOLE_BLOCK,))
    set_policy(most)
    return Choice(most, measured[most][0], measured[most][1], budget_bytes, most.cost(model), False)
