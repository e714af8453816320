"""Block-wise FP8 GEMM with FP32 promotion: the public API.

    out = fp8_gemm(a, a_scale, b, b_scale)          out [M, N] bf16 = a [M, K] @ b [N, K].T
    fp8_gemm(a, a_scale, b, b_scale, out=acc, accumulate=True)     acc [M, N] fp32 += a @ b.T

a and b are float8_e4m3fn; a_scale [M, K/128] fp32 holds one scale per 1 x 128 tile (either
layout per_token_group_quant produces; "col" is what the CUDA kernel reads directly). b_scale is
[ceil(N/128), K/128] (one per 128 x 128 block: weights, "1D2D") or [N, K/128] (one per 1 x 128 tile:
the weight gradient's second operand, "1D1D"). The numerics are specified in
dskernels.reference.gemm. The three GEMMs of a Linear layer y = x W^T are in dskernels.linear.
"""
import torch

from dskernels import backend as _backend
from dskernels.checks import check_bool, check_choice, check_shape, check_tensor
from dskernels.reference import gemm as _ref
from dskernels.reference.quant import cdiv

FP8 = torch.float8_e4m3fn


def is_mn_major(scale: torch.Tensor) -> bool:
    """scale [R, Kb] with strides (1, ld), ld % 4 == 0 and ld >= R: what a TMA load of one K block's scales
    for a tile of rows needs."""
    return scale.stride(0) == 1 and scale.stride(1) % 4 == 0 and scale.stride(1) >= scale.shape[0]


def mn_major(scale: torch.Tensor) -> torch.Tensor:
    """scale in the MN-major layout (is_mn_major); copies only when the caller's layout differs."""
    if is_mn_major(scale):
        return scale
    R, Kb = scale.shape
    return _backend.empty((R, Kb), torch.float32, scale.device, strides=(1, cdiv(R, 4) * 4)).copy_(scale)


def _per_row(b, b_scale) -> bool:
    """Whether b_scale has one scale per 1 x 128 tile ("1D1D") rather than per 128 x 128 block."""
    return b_scale.shape[0] == b.shape[0] and b.shape[0] > 1


def _cuda(a, a_scale, b, b_scale, out, accumulate):
    per_row = _per_row(b, b_scale)
    a_scale = mn_major(a_scale)
    b_scale = mn_major(b_scale) if per_row else b_scale.contiguous()
    _launch(a, a_scale, b, b_scale, out, accumulate, per_row, _backend.device_properties(a.device.index or 0)["sms"])


def _in_kernel_layout(a_scale, b_scale, per_row) -> bool:
    """Whether _cuda would pass the scales to the kernel as they are (no copy)."""
    return is_mn_major(a_scale) and (is_mn_major(b_scale) if per_row else b_scale.is_contiguous())


def _launch(a, a_scale, b, b_scale, out, accumulate, per_row, sms):
    """The CUDA kernel on operands in its layouts (a_scale, and b_scale when per_row, MN-major; else
    b_scale contiguous), on the current device."""
    pa, psa, pb, psb = a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr()
    if (pa | psa | pb | psb) & 15:
        require_tma_aligned(a=pa, a_scale=psa, b=pb, b_scale=psb)
    M, K = a.shape
    _backend._C.fp8_gemm(pa, psa, a_scale.stride(1), pb, psb, b_scale.stride(1) if per_row else 0, per_row,
                         out.data_ptr(), out.dtype is torch.float32, accumulate, M, b.shape[0], K, sms,
                         _backend.stream(a))


def require_tma_aligned(**addresses):
    """Raises naming the first operand whose address is not 16-byte aligned (the CUDA kernels' TMA loads)."""
    for name, p in addresses.items():
        if p % 16:
            raise ValueError(f"{name} must start at a 16-byte aligned address for the CUDA kernel's TMA loads "
                             f"(a slice that starts mid-row breaks this)")


def _triton(a, a_scale, b, b_scale, out, accumulate):
    from dskernels.triton import gemm as tg  # imported lazily: triton is optional
    tg.fp8_gemm(a, a_scale, b, b_scale, out, accumulate)


def _reference(a, a_scale, b, b_scale, out, accumulate):
    result = _ref.fp8_gemm(a, a_scale, b, b_scale, torch.float32)
    out.copy_(out + result if accumulate else result)


_BACKENDS = {"reference": _reference, "triton": _triton, "cuda": _cuda}


def _gemm(a, a_scale, b, b_scale, out_dtype, backend):
    out = _backend.empty((a.shape[0], b.shape[0]), out_dtype, a.device)
    with _backend.on_device(a):
        _BACKENDS[backend](a, a_scale, b, b_scale, out, False)
    return out


def _gemm_out(a, a_scale, b, b_scale, out, accumulate, backend):
    with _backend.on_device(a):
        _BACKENDS[backend](a, a_scale, b, b_scale, out, accumulate)


# torch.library ops for torch.compile, export and fake tensors; plain eager calls skip the dispatcher
# (backend.eager) and run the same implementations directly.
@torch.library.custom_op("dskernels::fp8_gemm", mutates_args=())
def _fp8_gemm_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    return _gemm(a, a_scale, b, b_scale, out_dtype, backend)


@_fp8_gemm_op.register_fake
def _(a, a_scale, b, b_scale, out_dtype, backend):
    return torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)


@torch.library.custom_op("dskernels::fp8_gemm_out", mutates_args=("out",))
def _fp8_gemm_out_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     out: torch.Tensor, accumulate: bool, backend: str) -> None:
    _gemm_out(a, a_scale, b, b_scale, out, accumulate, backend)


@_fp8_gemm_out_op.register_fake
def _(a, a_scale, b, b_scale, out, accumulate, backend):
    return None


def fp8_gemm(a, a_scale, b, b_scale, *, out=None, out_dtype=torch.bfloat16, accumulate=False,
             backend: str = "auto"):
    """out [M, N] = a [M, K] @ b [N, K].T with block-wise scales and FP32 promotion every 128 K.

    a: [M, K] float8_e4m3fn, contiguous, K % 128 == 0. a_scale: [M, K/128] float32, row-major or
    MN-major (per_token_group_quant(..., scale_layout="col")). b: [N, K] float8_e4m3fn, contiguous.
    b_scale: [ceil(N/128), K/128] (per 128 x 128 block) or [N, K/128] (per 1 x 128 tile) float32.
    out: optional [M, N] output, contiguous; out_dtype bfloat16 or float32 when out is None.
    accumulate: out += a @ b.T; needs a float32 out. Returns out.
    backend: "auto", "cuda" (sm_90), "triton" (sm_89 and newer) or "reference". The CUDA kernel also
    needs a and b to start at 16-byte aligned addresses (checked when it runs).
    """
    # In plain eager mode the checks' verdict is cached per argument signature (shapes, strides, dtypes,
    # devices, options and their types), so a repeated call costs a dictionary lookup instead of the checks;
    # with it, whether the CUDA kernel can take the operands as they are (then launched right here).
    direct = _backend.eager(a, a_scale, b, b_scale, *(() if out is None else (out,)))
    key = plan = None
    if direct:
        try:
            key = (_backend.signature(a, a_scale, b, b_scale, out), out_dtype, type(accumulate), accumulate, backend)
            plan = _PLANS.get(key)
        except TypeError:  # an unhashable option: the checks below name it
            key = None
        if plan is not None and plan[1] is not None and a.device.index == torch._C._cuda_getDevice():
            if out is None:
                out = _backend.empty((a.shape[0], b.shape[0]), out_dtype, a.device)
            _launch(a, a_scale, b, b_scale, out, accumulate, plan[1], plan[2])
            return out
    if plan is None:
        a, a_scale, b, b_scale, out, name = _checked(a, a_scale, b, b_scale, out, out_dtype, accumulate, backend)
        direct = _backend.eager(a, a_scale, b, b_scale, *(() if out is None else (out,)))  # foreign arrays
        if key is not None:
            if len(_PLANS) > 4096:
                _PLANS.clear()
            per_row = _per_row(b, b_scale)
            fast = name == "cuda" and direct and _in_kernel_layout(a_scale, b_scale, per_row)
            _PLANS[key] = plan = (name, per_row if fast else None,
                                  _backend.device_properties(a.device.index)["sms"] if fast else None)
        else:
            plan = (name, None, None)
    name = plan[0]
    if out is None:
        return (_gemm if direct else _fp8_gemm_op)(a, a_scale, b, b_scale, out_dtype, name)
    (_gemm_out if direct else _fp8_gemm_out_op)(a, a_scale, b, b_scale, out, accumulate, name)
    return out


# argument signature -> (backend name, per_row, SM count) for arguments that passed _checked; per_row (the
# b_scale granularity) is None unless the CUDA kernel takes the operands as they are, in plain eager mode
_PLANS = {}


def _checked(a, a_scale, b, b_scale, out, out_dtype, accumulate, backend):
    """Every argument rule (raising naming the argument), foreign arrays as tensors, and the backend."""
    a, a_scale = _backend.as_tensor("a", a), _backend.as_tensor("a_scale", a_scale)
    b, b_scale = _backend.as_tensor("b", b), _backend.as_tensor("b_scale", b_scale)
    check_tensor("a", a, dtypes=(FP8,), ndim=2)
    check_tensor("b", b, dtypes=(FP8,), ndim=2, device=a.device)
    check_bool("accumulate", accumulate)
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"b must have K = {K} columns like a (b is [N, K]: out = a @ b.T), got shape "
                         f"{tuple(b.shape)}")
    if K % 128:
        raise ValueError(f"K must be a multiple of 128 (one scale block), got K = {K}")
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), ndim=2, device=a.device, contiguous=False)
    check_shape("a_scale", a_scale, (M, K // 128))
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,), ndim=2, device=a.device, contiguous=False)
    if tuple(b_scale.shape) not in ((cdiv(N, 128), K // 128), (N, K // 128)):
        raise ValueError(f"b_scale must have shape {(cdiv(N, 128), K // 128)} (per 128 x 128 block) or "
                         f"{(N, K // 128)} (per 1 x 128 tile), got {tuple(b_scale.shape)}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an out tensor to add into")
        check_choice("out_dtype", out_dtype, (torch.bfloat16, torch.float32))
    else:
        out = _backend.as_tensor("out", out)
        check_tensor("out", out, dtypes=(torch.float32,) if accumulate else (torch.bfloat16, torch.float32),
                     ndim=2, device=a.device)
        check_shape("out", out, (M, N))
    return a, a_scale, b, b_scale, out, _backend.resolve("fp8_gemm", backend, a.device)


def gemm_unchecked(a, a_scale, b, b_scale, out_dtype, backend):
    """fp8_gemm's work without its checks, for dskernels' own layers (dskernels.linear), whose operands
    already satisfy every rule (a check costs host time on every call)."""
    name = _backend.resolve("fp8_gemm", backend, a.device)
    return _backend.pick(_gemm, _fp8_gemm_op, a, a_scale, b, b_scale)(a, a_scale, b, b_scale, out_dtype, name)


def gemm_into_unchecked(a, a_scale, b, b_scale, out, accumulate, backend):
    name = _backend.resolve("fp8_gemm", backend, a.device)
    _backend.pick(_gemm_out, _fp8_gemm_out_op, a, a_scale, b, b_scale, out)(a, a_scale, b, b_scale, out,
                                                                           accumulate, name)
