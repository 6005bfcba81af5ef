"""Triton device functions shared by the subset kernels: the counter-based subset generator and the dot.

Must match ``dynbatch_kernels.reference.subset_masks`` bit for bit (tested in ``tests/test_kernels_triton.py``): lowbias32
in uint32 arithmetic, whose wrap-around is what the reference emulates in int64.
"""
import triton
import triton.language as tl


@triton.jit
def mix32(x):
    """lowbias32 on uint32 values; products wrap modulo 2^32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def mask_tile(masks_ptr, seed, thr, rows, cols, N, B, MODE: tl.constexpr):
    """Membership of samples ``cols`` (BB,) in subsets ``rows`` (BN,): bool (BN, BB), False outside N x B.

    MODE 0 reads a uint8 (N, B) mask tensor; 1 is ``bernoulli`` with integer threshold ``thr``; 2 is
    ``uniform_size`` (each subset's threshold drawn from its key).
    """
    valid = (rows[:, None] < N) & (cols[None, :] < B)
    if MODE == 0:
        offs = rows[:, None].to(tl.int64) * B + cols[None, :]
        m = tl.load(masks_ptr + offs, mask=valid, other=0) != 0
    else:
        key = subset_key(seed, rows)
        m = member(key[:, None], cols[None, :], subset_limit(key, thr, MODE)[:, None])
    return m & valid


@triton.jit
def subset_key(seed, rows):
    """Each subset's 32-bit key from the seed and its index (any shape)."""
    return mix32(mix32(seed.to(tl.uint32)) + rows.to(tl.uint32))


@triton.jit
def subset_limit(key, thr, MODE: tl.constexpr):
    """The threshold a sample's 24-bit draw must stay below: ``thr`` (bernoulli) or the subset's own rate."""
    if MODE == 1:
        return thr.to(tl.uint32) + tl.zeros_like(key)
    return mix32(key ^ 0x5BD1E995) >> 8


@triton.jit
def member(key, cols, limit):
    """Whether samples ``cols`` belong to the subsets of ``key`` (shapes broadcast)."""
    return (mix32(key + cols.to(tl.uint32) * 0x9E3779B9) >> 8) < limit


@triton.jit
def low_precision_dot(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr):
    """acc + a @ b with both operands in DOT_DTYPE and fp32 accumulation.

    ROUND_ONLY rounds the operands to DOT_DTYPE and multiplies them in fp32: the same numbers, for the CPU
    interpreter, whose ``tl.dot`` multiplies the raw bits of bfloat16 operands (triton-lang/triton#11584).
    """
    # Operands pass through fp32 first: masks arrive as bool, and the interpreter turns bool -> bfloat16 into 0.
    a = a.to(tl.float32).to(DOT_DTYPE)
    b = b.to(tl.float32).to(DOT_DTYPE)
    if ROUND_ONLY:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_dtype_args(dot_dtype, tf32: bool = False) -> dict:
    """Launch constants for ``low_precision_dot``: fp32 runs as IEEE fp32 (or as tf32 on tensor cores with
    ``tf32``); bf16/fp16 run on tensor cores in that type."""
    import os

    import torch

    tl_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dot_dtype]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return {"DOT_DTYPE": tl_dtype, "PRECISION": "tf32" if tf32 or dot_dtype != torch.float32 else "ieee",
            "ROUND_ONLY": interpreted and dot_dtype == torch.bfloat16}
