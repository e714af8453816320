"""Device helpers shared by the Triton kernels: FP8 scales and exact casts.

Triton's CPU interpreter also multiplies bf16 tiles in tl.dot as raw 16-bit integers: dot_bf16
upcasts them to fp32 first there (exact: the products of bf16 values fit fp32's mantissa).

Triton's CPU interpreter casts fp32 -> e4m3 and fp32 -> bf16 wrongly (it drops the carry into the
exponent, turns NaN into 384 and back into 480, truncates bf16), while compiled Triton on the GPU rounds exactly like
torch. Under the interpreter (EMULATE=True) the e4m3 byte is built with integer bit operations and
bitcast, and a bf16 value is first rounded onto the bf16 grid (round to nearest even), where the
interpreter's cast is exact. On the GPU the hardware casts are kept.
"""
import os

import triton
import triton.language as tl

EMULATE_CASTS = os.environ.get("TRITON_INTERPRET") == "1"
FP8_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(1e-12)


@triton.jit
def scale_from_amax(amax, POW2: tl.constexpr):
    """amax / 448 (POW2: rounded up to a power of two: a full mantissa of ones carries into the
    exponent unless the mantissa is 0). Same fp32 operations as the reference."""
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), FP8_MAX)
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        scale = (((bits + 0x7FFFFF) >> 23) << 23).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def e4m3_bits(y):
    """The e4m3 encoding of y (fp32, |y| <= 448 or NaN), rounded to nearest even, as int8."""
    bits = y.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # normal range: keep 3 mantissa bits, round half to even; a carry moves into the exponent
    rounded = (mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20
    normal = rounded - (120 << 3)  # rebias the exponent: fp32 127 -> e4m3 7
    a = mag.to(tl.float32, bitcast=True)
    # subnormal range (< 2**-6): adding 2**14 leaves exactly the multiples of 2**-9 representable;
    # their count (0..8) is the encoding, 8 being the smallest normal
    sub = (((a + 16384.0) - 16384.0) * 512.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal) | tl.where(bits < 0, 0x80, 0)
    return tl.where(y != y, 0x7F, code).to(tl.int8)


@triton.jit
def to_e4m3(y, EMULATE: tl.constexpr):
    """Clamp to +-448 (NaN kept) and cast to e4m3 with round-to-nearest-even."""
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX))
    if EMULATE:
        return e4m3_bits(y).to(tl.float8e4nv, bitcast=True)
    return y.to(tl.float8e4nv)


@triton.jit
def from_e4m3(q, EMULATE: tl.constexpr):
    """e4m3 -> fp32 (exact); under the interpreter the NaN encoding is decoded by hand."""
    y = q.to(tl.float32)
    if EMULATE:
        y = tl.where((q.to(tl.int8, bitcast=True) & 0x7F) == 0x7F, float("nan"), y)
    return y


@triton.jit
def round_to_bf16_grid(y):
    bits = y.to(tl.int32, bitcast=True)
    r = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return tl.where(y != y, y, r)


@triton.jit
def to_bf16(y, EMULATE: tl.constexpr):
    if EMULATE:
        y = round_to_bf16_grid(y)
    return y.to(tl.bfloat16)


@triton.jit
def dot_bf16(a, b, EMULATE: tl.constexpr):
    """tl.dot of bf16 tiles with fp32 accumulation (wgmma on Hopper)."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def swizzled_tile(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid over a grid_m x grid_n tile grid in grouped order: GROUP_M row-blocks
    share each column-block while it sits in L2."""
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_size
    pid_n = (pid % (GROUP_M * grid_n)) // group_size
    return pid_m, pid_n
