"""Engine ops: one op per module (see DESIGN.md §3); each public function takes ``backend=``."""

from engine.ops.patchify import patchify, unpatchify
from engine.ops.norm_modulate import norm_modulate, add_norm_modulate
from engine.ops.cross_attention import cross_attention
from engine.ops.self_attention import self_attention
from engine.ops.linear import linear, linear_branch, linear_chunks
from engine.ops.gated_add import gated_add
from engine.ops.mlp import mlp
