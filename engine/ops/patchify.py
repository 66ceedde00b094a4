"""patchify / unpatchify: latent images (B, C, H, W) <-> patch tokens (B, N, C*p*p).

Tokens are the N = (H/p)*(W/p) non-overlapping p x p patches in row-major order (patch row,
then patch column); each token vector is ordered (channel, row in patch, column in patch).
That is the order of a Conv2d(C, D, kernel_size=p, stride=p) weight, so a patch-embedding
Linear with weight ``conv.weight.reshape(D, C*p*p)`` equals the convolution.

Both directions are permutations: every backend must match the eager reference exactly, and
each one's backward is the other's forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.ops.backend import cuda_stream, dtype_code, extension, resolve


# ---------------------------------------------------------------------------------------------
# Eager reference


def patchify_ref(x: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = x.shape
    patches = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, H/p, p, W/p, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return patches.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)


def unpatchify_ref(tokens: torch.Tensor, C: int, H: int, W: int, p: int) -> torch.Tensor:
    B = tokens.shape[0]
    patches = tokens.reshape(B, H // p, W // p, C, p, p)  # (B, H/p, W/p, C, p, p)
    patches = patches.permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
    return patches.reshape(B, C, H, W)  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# Triton kernels: one program per (block of tokens, sample), each a (tokens x patch vector)
# tile. Forward gathers image -> tokens; backward scatters tokens -> image, which is also
# unpatchify's forward.


@triton.jit
def _patch_tile_offsets(token_block, b, C, H, W, p, n_tokens, patch_dim, patches_per_row,
                        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    token = token_block * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    within = tl.arange(0, BLOCK_K)  # (BLOCK_K,) index in the patch vector: (c, i, j)
    channel = within // (p * p)
    y = (token // patches_per_row)[:, None] * p + ((within // p) % p)[None, :]  # (BLOCK_T, BLOCK_K)
    x = (token % patches_per_row)[:, None] * p + (within % p)[None, :]  # (BLOCK_T, BLOCK_K)
    image_offset = ((b * C + channel[None, :]) * H + y) * W + x  # (BLOCK_T, BLOCK_K), int64 via b
    token_offset = (b * n_tokens + token[:, None]) * patch_dim + within[None, :]  # (BLOCK_T, BLOCK_K)
    mask = (token[:, None] < n_tokens) & (within[None, :] < patch_dim)
    return image_offset, token_offset, mask


@triton.jit
def _patchify_fwd_kernel(image_ptr, tokens_ptr, C, H, W, p, n_tokens, patch_dim, patches_per_row,
                         BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)  # int64 offsets: large batches pass 2^31 elements
    image_offset, token_offset, mask = _patch_tile_offsets(
        tl.program_id(0), b, C, H, W, p, n_tokens, patch_dim, patches_per_row, BLOCK_T, BLOCK_K)
    values = tl.load(image_ptr + image_offset, mask=mask)
    tl.store(tokens_ptr + token_offset, values, mask=mask)


@triton.jit
def _patchify_bwd_kernel(tokens_ptr, image_ptr, C, H, W, p, n_tokens, patch_dim, patches_per_row,
                         BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    image_offset, token_offset, mask = _patch_tile_offsets(
        tl.program_id(0), b, C, H, W, p, n_tokens, patch_dim, patches_per_row, BLOCK_T, BLOCK_K)
    values = tl.load(tokens_ptr + token_offset, mask=mask)
    tl.store(image_ptr + image_offset, values, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers: write into a given, contiguous output (tests hand in NaN-filled buffers).

_TILE_ELEMENTS = 2048  # elements per program: small enough to keep the tile in registers


def _triton_launch(kernel, source: torch.Tensor, destination: torch.Tensor, image_shape, p: int) -> None:
    B, C, H, W = image_shape
    n_tokens, patch_dim = (H // p) * (W // p), C * p * p
    block_k = triton.next_power_of_2(patch_dim)
    block_t = min(triton.next_power_of_2(n_tokens), max(1, _TILE_ELEMENTS // block_k))
    grid = (triton.cdiv(n_tokens, block_t), B)
    kernel[grid](source, destination, C, H, W, p, n_tokens, patch_dim, W // p, BLOCK_T=block_t, BLOCK_K=block_k)


def _patchify_triton(x: torch.Tensor, tokens: torch.Tensor, p: int) -> None:
    _triton_launch(_patchify_fwd_kernel, x, tokens, x.shape, p)


def _unpatchify_triton(tokens: torch.Tensor, image: torch.Tensor, p: int) -> None:
    _triton_launch(_patchify_bwd_kernel, tokens, image, image.shape, p)


def _patchify_cuda(x: torch.Tensor, tokens: torch.Tensor, p: int) -> None:
    B, C, H, W = x.shape
    extension().patchify(x.data_ptr(), tokens.data_ptr(), B, C, H, W, p,
                         dtype_code(x), x.get_device(), cuda_stream(x))  # get_device(): -1 on CPU


def _unpatchify_cuda(tokens: torch.Tensor, image: torch.Tensor, p: int) -> None:
    B, C, H, W = image.shape
    extension().unpatchify(tokens.data_ptr(), image.data_ptr(), B, C, H, W, p,
                           dtype_code(tokens), tokens.get_device(), cuda_stream(tokens))


_PATCHIFY_LAUNCHERS = {"triton": _patchify_triton, "cuda": _patchify_cuda}
_UNPATCHIFY_LAUNCHERS = {"triton": _unpatchify_triton, "cuda": _unpatchify_cuda}


# ---------------------------------------------------------------------------------------------
# torch.library registration: custom ops with fake (meta) kernels and autograd, so autograd
# and torch.compile see one opaque op per call. The eager backend bypasses them.


@torch.library.custom_op("engine::patchify", mutates_args=())
def _patchify_op(x: torch.Tensor, p: int, backend: str) -> torch.Tensor:
    x = x.contiguous()
    B, C, H, W = x.shape
    tokens = x.new_empty((B, (H // p) * (W // p), C * p * p))
    _PATCHIFY_LAUNCHERS[backend](x, tokens, p)
    return tokens


@_patchify_op.register_fake
def _(x: torch.Tensor, p: int, backend: str) -> torch.Tensor:
    B, C, H, W = x.shape
    return x.new_empty((B, (H // p) * (W // p), C * p * p))


@torch.library.custom_op("engine::unpatchify", mutates_args=())
def _unpatchify_op(tokens: torch.Tensor, C: int, H: int, W: int, p: int, backend: str) -> torch.Tensor:
    tokens = tokens.contiguous()
    image = tokens.new_empty((tokens.shape[0], C, H, W))
    _UNPATCHIFY_LAUNCHERS[backend](tokens, image, p)
    return image


@_unpatchify_op.register_fake
def _(tokens: torch.Tensor, C: int, H: int, W: int, p: int, backend: str) -> torch.Tensor:
    return tokens.new_empty((tokens.shape[0], C, H, W))


def _patchify_setup_context(ctx, inputs, output) -> None:
    x, ctx.p, ctx.backend = inputs
    ctx.image_shape = tuple(x.shape)


def _patchify_backward(ctx, grad_tokens: torch.Tensor):
    _, C, H, W = ctx.image_shape
    return _unpatchify_op(grad_tokens, C, H, W, ctx.p, ctx.backend), None, None


def _unpatchify_setup_context(ctx, inputs, output) -> None:
    _, _, _, _, ctx.p, ctx.backend = inputs


def _unpatchify_backward(ctx, grad_image: torch.Tensor):
    return _patchify_op(grad_image, ctx.p, ctx.backend), None, None, None, None, None


_patchify_op.register_autograd(_patchify_backward, setup_context=_patchify_setup_context)
_unpatchify_op.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions


def _check_patch(p, H: int, W: int) -> None:
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f"p (patch size) must be a positive int, got {p!r}")
    if H % p or W % p:
        raise ValueError(f"H and W must be multiples of p: got H={H}, W={W}, p={p}")


def patchify(x: torch.Tensor, p: int, backend: str | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p); see the module docstring for the order."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    _check_patch(p, x.shape[2], x.shape[3])
    name = resolve(backend, x.device, "patchify", prefer=("cuda", "triton"))
    if name == "eager":
        return patchify_ref(x, p)
    return _patchify_op(x, p, name)


def unpatchify(tokens: torch.Tensor, C: int, H: int, W: int, p: int, backend: str | None = None) -> torch.Tensor:
    """(B, (H/p)*(W/p), C*p*p) -> (B, C, H, W), the inverse of ``patchify``."""
    for field, value in (("C", C), ("H", H), ("W", W)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{field} must be a positive int, got {value!r}")
    _check_patch(p, H, W)
    expected = ((H // p) * (W // p), C * p * p)
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
        raise ValueError(f"tokens must be (B, {expected[0]}, {expected[1]}) for C={C}, H={H}, W={W}, p={p}, "
                         f"got shape {tuple(tokens.shape)}")
    name = resolve(backend, tokens.device, "unpatchify", prefer=("cuda", "triton"))
    if name == "eager":
        return unpatchify_ref(tokens, C, H, W, p)
    return _unpatchify_op(tokens, C, H, W, p, name)
