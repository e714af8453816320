"""Grouped GEMMs for mixture-of-experts layers (as DeepGEMM's): the public API.

    m_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, m_indices)   prefill / training
        a [M_total, K] e4m3 with a_scale [M_total, K/128] (per_token_group_quant, either layout), b [G, N, K]
        e4m3 with b_scale [G, ceil(N/128), K/128] (per_block_quant per expert), m_indices [M_total] int32:
        each row's expert, -1 for padding rows; expert e's rows are one segment that starts at a multiple of
        get_mk_alignment_for_contiguous_layout() (128), padded with -1 rows to the next multiple.
        -> out [M_total, N] bf16, out[m] = a[m] @ b[m_indices[m]].T; padding rows are never written.
    m_grouped_fp8_gemm_nt_masked(a, a_scale, b, b_scale, masked_m, expected_m)   decode, CUDA graphs
        a [G, M_max, K] with a_scale [G, M_max, K/128], masked_m [G] int32 on the device: expert g's valid
        rows; expected_m: about how many rows an expert has (a tuning hint, never a bound).
        -> out [G, M_max, N] bf16; rows at or past masked_m[g] are never written.
    m_grouped_bf16_gemm_nt_contiguous(a, b, m_indices), m_grouped_bf16_gemm_nt_masked(a, b, masked_m,
        expected_m): the same with bf16 a and b (any K), fp32 accumulation.

    k_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, k_offsets, out, accumulate=True)
        the experts' weight gradients: out[g] [M, N] fp32 (+)= a[:, seg_g] @ b[:, seg_g].T, seg_g =
        [k_offsets[g], k_offsets[g + 1]) (k_offsets [G + 1] int32 on the device, every segment a multiple of
        128 long, zero allowed), a [M, K_total] and b [N, K_total] e4m3 with 1 x 128 scales along K
        (a_scale [M, K_total/128], b_scale [N, K_total/128]): dW_g = dy_g^T x_g with a = dy^T, b = x^T over
        the tokens of the contiguous layout, as per_token_group_quant_transposed makes them (its "nt": both
        operands K-major, where DeepGEMM's k_grouped_fp8_gemm_tn_contiguous takes them token-major). The
        whole segment is reduced, its padding tokens included: they must be zero (a permute writes them so).
        A group whose segment breaks the rule comes back NaN.
    k_grouped_bf16_gemm_nt_contiguous(a, b, k_offsets, out, accumulate=True): the same with bf16 a and b.

The numerics are the dense GEMM's (dskernels.reference.gemm), per expert: dskernels.reference.grouped_gemm
is the specification. Backends: "cuda" (sm_90: the dense kernel's mainloop with a tile scheduler per
layout, csrc/gemm/fp8_grouped_gemm.h; the FP8 forms), "triton" (every form), "reference"; "auto" takes
CUDA, then Triton.
The CUDA kernels take a_scale MN-major (per_token_group_quant(..., scale_layout="col"), and for the masked
form its [G * M_max, K/128] result viewed as [G, M_max, K/128], or MN-major per expert); other layouts
are copied into that one on each call. No host sync: m_indices and masked_m are read on the device, so
the masked form is CUDA-graph capturable with masked_m changing between replays. A row whose m_indices entry breaks the
layout (an id >= G or below -1, or a segment that does not start on the alignment) comes back NaN.
"""
import torch

from dskernels import backend as _backend
from dskernels.checks import check_bool, check_int, check_shape, check_tensor
from dskernels.gemm import is_mn_major, mn_major, require_tma_aligned
from dskernels.reference import grouped_gemm as _ref
from dskernels.reference.quant import cdiv

FP8 = torch.float8_e4m3fn

__all__ = ["get_mk_alignment_for_contiguous_layout", "m_grouped_fp8_gemm_nt_contiguous",
           "m_grouped_fp8_gemm_nt_masked", "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked",
           "k_grouped_fp8_gemm_nt_contiguous", "k_grouped_bf16_gemm_nt_contiguous"]


def get_mk_alignment_for_contiguous_layout() -> int:
    """The row multiple each expert's segment of a contiguous layout starts at (and is padded to)."""
    return _ref.ALIGNMENT


# ---------------------------------------------------------------------------------------------
# Backends: each fills out's written rows.

def _reference(a, a_scale, b, b_scale, rows, out, masked, hint_m):
    kind = "bf16" if a_scale is None else "fp8"
    if masked:
        counts = rows.cpu()
        got = _ref.m_grouped_gemm_masked(kind, a, a_scale, b, b_scale, counts)
        for g, n in enumerate(counts.clamp(0, a.shape[1]).tolist()):
            out[g, :n] = got[g, :n]
    else:
        got = _ref.m_grouped_gemm_contiguous(kind, a, a_scale, b, b_scale, rows)
        written = rows != -1
        out[written] = got[written]


def _triton(a, a_scale, b, b_scale, rows, out, masked, hint_m):
    from dskernels.triton import grouped_gemm as tg  # imported lazily: triton is optional
    tg.grouped_gemm(a, a_scale, b, b_scale, rows, out, masked, hint_m)


def _masked_scales_ready(a_scale, M_max) -> bool:
    """Whether a_scale [G, M_max, Kb] is in a layout the CUDA kernel reads as it is: m the unit stride and
    16-byte strides, one MN-major array over the G * M_max rows or one per expert."""
    G, _, Kb = a_scale.shape
    s_g, s_m, s_k = a_scale.stride()
    return s_m == 1 and s_k % 4 == 0 and ((s_g == M_max and s_k >= G * M_max) or
                                          (s_g % 4 == 0 and s_k >= M_max and s_g >= s_k * Kb))


def _masked_scales(a_scale, M_max):
    """a_scale as _masked_scales_ready wants it, copied into the per-expert MN-major layout otherwise."""
    if _masked_scales_ready(a_scale, M_max):
        return a_scale
    G, _, Kb = a_scale.shape
    ld = cdiv(M_max, 4) * 4
    return _backend.empty((G, M_max, Kb), torch.float32, a_scale.device, strides=(ld * Kb, 1, ld)).copy_(a_scale)


def _cuda_launch(a, a_scale, b, b_scale, rows, out, masked, hint_m, sms):
    """The CUDA kernel on operands in its layouts (a_scale MN-major, b_scale contiguous), current device."""
    pa, psa, pb = a.data_ptr(), a_scale.data_ptr(), b.data_ptr()
    if (pa | psa | pb) & 15:
        require_tma_aligned(a=pa, a_scale=psa, b=pb)
    G, N, K = b.shape
    if masked:
        _backend._C.m_grouped_fp8_gemm_masked(pa, psa, a_scale.stride(2), a_scale.stride(0), pb, b_scale.data_ptr(),
                                              rows.data_ptr(), out.data_ptr(), a.shape[1], N, K, G, hint_m, sms,
                                              _backend.stream(a))
    else:
        _backend._C.m_grouped_fp8_gemm_contiguous(pa, psa, a_scale.stride(1), pb, b_scale.data_ptr(), rows.data_ptr(),
                                                  out.data_ptr(), a.shape[0], N, K, G, sms, _backend.stream(a))


def _cuda_ready(a_scale, b_scale, masked, M) -> bool:
    """Whether _cuda would pass the scales to the kernel as they are (no copy)."""
    return b_scale.is_contiguous() and (_masked_scales_ready(a_scale, M) if masked else is_mn_major(a_scale))


def _cuda(a, a_scale, b, b_scale, rows, out, masked, hint_m):
    a_scale = _masked_scales(a_scale, a.shape[1]) if masked else mn_major(a_scale)
    _cuda_launch(a, a_scale, b, b_scale.contiguous(), rows, out, masked, hint_m,
                 _backend.device_properties(a.device.index)["sms"])


_BACKENDS = {"reference": _reference, "triton": _triton, "cuda": _cuda}


def _grouped(a, a_scale, b, b_scale, rows, out, masked, hint_m, backend):
    if a.numel() and out.numel():
        with _backend.on_device(a):
            _BACKENDS[backend](a, a_scale, b, None if b_scale is None else b_scale.contiguous(), rows, out, masked,
                               hint_m)


@torch.library.custom_op("dskernels::m_grouped_gemm", mutates_args=("out",))
def _grouped_op(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor | None,
                rows: torch.Tensor, out: torch.Tensor, masked: bool, hint_m: int, backend: str) -> None:
    _grouped(a, a_scale, b, b_scale, rows, out, masked, hint_m, backend)


@_grouped_op.register_fake
def _(a, a_scale, b, b_scale, rows, out, masked, hint_m, backend):
    return None


# ---------------------------------------------------------------------------------------------
# Checks and the public functions.

def _check(op, a, a_scale, b, b_scale, rows, rows_name, out, masked, backend):
    """Every argument rule, raising naming the argument; returns (tensors..., out, backend name)."""
    fp8 = a_scale is not None
    dtype = FP8 if fp8 else torch.bfloat16
    names = ("a", "a_scale", "b", "b_scale", rows_name, "out")
    a, a_scale, b, b_scale, rows, out = (None if t is None else _backend.as_tensor(n, t)
                                         for n, t in zip(names, (a, a_scale, b, b_scale, rows, out)))
    # (BF16 operands by their strides, transposed views too; FP8's K-major, as wgmma reads e4m3)
    check_tensor("a", a, dtypes=(dtype,), ndim=3 if masked else 2, nonempty=False, contiguous=fp8)
    check_tensor("b", b, dtypes=(dtype,), ndim=3, device=a.device, contiguous=fp8)
    G, N, K = b.shape
    if a.shape[-1] != K:
        raise ValueError(f"a must have K = {K} columns like b (b is [G, N, K]: out = a @ b[e].T), got shape "
                         f"{tuple(a.shape)}")
    if masked and a.shape[0] != G:
        raise ValueError(f"a must be [G, M_max, K] with G = {G} experts like b, got shape {tuple(a.shape)}")
    if fp8:
        if K % 128:
            raise ValueError(f"K must be a multiple of 128 (one scale block), got K = {K}")
        check_tensor("a_scale", a_scale, dtypes=(torch.float32,), ndim=a.dim(), device=a.device, contiguous=False,
                     nonempty=False)
        check_shape("a_scale", a_scale, (*a.shape[:-1], K // 128))
        check_tensor("b_scale", b_scale, dtypes=(torch.float32,), ndim=3, device=a.device, contiguous=False)
        check_shape("b_scale", b_scale, (G, cdiv(N, 128), K // 128))
    check_tensor(rows_name, rows, dtypes=(torch.int32,), ndim=1, device=a.device, nonempty=False)
    check_shape(rows_name, rows, (G,) if masked else (a.shape[0],))
    shape = (*a.shape[:-1], N)
    if out is not None:
        check_tensor("out", out, dtypes=(torch.bfloat16,), ndim=len(shape), device=a.device, nonempty=False)
        check_shape("out", out, shape)
    name = _backend.resolve(op, backend, a.device)
    return a, a_scale, b, b_scale, rows, out, shape, name


# argument signature -> SM count, for calls that passed _check, resolved to the CUDA backend in plain eager
# mode with operands in the kernel's layouts: a repeated call launches at once (the checks' verdict cannot
# change for the same shapes, strides, dtypes and devices)
_PLANS = {}


def _run(op, a, a_scale, b, b_scale, rows, rows_name, out, masked, hint_m, backend):
    tensors = (a, a_scale, b, b_scale, rows, out)
    key = None
    if _backend.eager(*(t for t in tensors if t is not None)):
        try:
            key = (op, masked, hint_m, backend, _backend.signature(*tensors))
        except (AttributeError, TypeError):  # a foreign array or an unhashable option: the checks name it
            key = None
        sms = _PLANS.get(key) if key is not None else None
        if sms is not None and a.device.index == torch._C._cuda_getDevice():
            if out is None:
                out = _backend.empty((*a.shape[:-1], b.shape[1]), torch.bfloat16, a.device)
            if a.numel() and out.numel():
                _cuda_launch(a, a_scale, b, b_scale, rows, out, masked, hint_m, sms)
            return out
    a, a_scale, b, b_scale, rows, out, shape, name = _check(op, a, a_scale, b, b_scale, rows, rows_name, out,
                                                            masked, backend)
    run = _backend.pick(_grouped, _grouped_op, *(t for t in (a, a_scale, b, b_scale, rows, out) if t is not None))
    if key is not None and run is _grouped and name == "cuda" and a_scale is not None and \
            _cuda_ready(a_scale, b_scale, masked, a.shape[1] if masked else 0):
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = _backend.device_properties(a.device.index)["sms"]
    if out is None:
        out = _backend.empty(shape, torch.bfloat16, a.device)
    run(a, a_scale, b, b_scale, rows, out, masked, hint_m, name)
    return out


def _hint(expected_m):
    return check_int("expected_m", expected_m, minimum=0)


def m_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, m_indices, *, out=None, backend: str = "auto"):
    """out [M_total, N] bf16: row m = a[m] @ b[m_indices[m]].T with FP32 promotion every 128 K (the module
    docstring has the layout). out: optional, written in place (its padding rows keep their values).
    backend: "auto", "cuda" (sm_90), "triton" (sm_89 and newer) or "reference"."""
    return _run("m_grouped_fp8_gemm", a, a_scale, b, b_scale, m_indices, "m_indices", out, False, 0, backend)


def m_grouped_fp8_gemm_nt_masked(a, a_scale, b, b_scale, masked_m, expected_m: int, *, out=None,
                                 backend: str = "auto"):
    """out [G, M_max, N] bf16: out[g, m] = a[g, m] @ b[g].T for m < masked_m[g] (module docstring)."""
    return _run("m_grouped_fp8_gemm", a, a_scale, b, b_scale, masked_m, "masked_m", out, True, _hint(expected_m),
                backend)


def m_grouped_bf16_gemm_nt_contiguous(a, b, m_indices, *, out=None, backend: str = "auto"):
    """The bf16 form of m_grouped_fp8_gemm_nt_contiguous: a [M_total, K], b [G, N, K] bf16, any K, any
    strides (b = w.transpose(1, 2) multiplies by w [G, K, N] without a copy)."""
    return _run("m_grouped_bf16_gemm", a, None, b, None, m_indices, "m_indices", out, False, 0, backend)


def m_grouped_bf16_gemm_nt_masked(a, b, masked_m, expected_m: int, *, out=None, backend: str = "auto"):
    """The bf16 form of m_grouped_fp8_gemm_nt_masked: a [G, M_max, K], b [G, N, K] bf16, any K, any strides."""
    return _run("m_grouped_bf16_gemm", a, None, b, None, masked_m, "masked_m", out, True, _hint(expected_m),
                backend)


# ---------------------------------------------------------------------------------------------
# The k-grouped weight gradient.

def _k_reference(a, a_scale, b, b_scale, k_offsets, out, accumulate):
    _ref.k_grouped_gemm(a, a_scale, b, b_scale, k_offsets.cpu(), out, accumulate)


def _k_triton(a, a_scale, b, b_scale, k_offsets, out, accumulate):
    from dskernels.triton import grouped_gemm as tg
    tg.k_grouped_gemm(a, a_scale, b, b_scale, k_offsets, out, accumulate)


def _k_cuda(a, a_scale, b, b_scale, k_offsets, out, accumulate):
    G, M, N = out.shape
    K_total = a.shape[1]
    if K_total == 0:  # no tokens: every segment must be empty; a group whose offsets are not 0 is broken
        broken = ((k_offsets[:-1] != 0) | (k_offsets[1:] != 0))[:, None, None]
        out.copy_(torch.where(broken, float("nan"), out if accumulate else 0.0))
        return
    a_scale, b_scale = mn_major(a_scale), mn_major(b_scale)
    require_tma_aligned(a=a.data_ptr(), a_scale=a_scale.data_ptr(), b=b.data_ptr(), b_scale=b_scale.data_ptr())
    _backend._C.k_grouped_fp8_gemm(a.data_ptr(), a_scale.data_ptr(), a_scale.stride(1), b.data_ptr(),
                                   b_scale.data_ptr(), b_scale.stride(1), k_offsets.data_ptr(), out.data_ptr(),
                                   accumulate, M, N, K_total, G,
                                   _backend.device_properties(a.device.index)["sms"], _backend.stream(a))


_K_BACKENDS = {"reference": _k_reference, "triton": _k_triton, "cuda": _k_cuda}


def _k_grouped(a, a_scale, b, b_scale, k_offsets, out, accumulate, backend):
    if out.numel():
        with _backend.on_device(a):
            _K_BACKENDS[backend](a, a_scale, b, b_scale, k_offsets, out, accumulate)


@torch.library.custom_op("dskernels::k_grouped_fp8_gemm", mutates_args=("out",))
def _k_grouped_op(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor | None,
                  k_offsets: torch.Tensor, out: torch.Tensor, accumulate: bool, backend: str) -> None:
    _k_grouped(a, a_scale, b, b_scale, k_offsets, out, accumulate, backend)


@_k_grouped_op.register_fake
def _(a, a_scale, b, b_scale, k_offsets, out, accumulate, backend):
    return None


def _run_k_grouped(op, a, a_scale, b, b_scale, k_offsets, out, accumulate, backend):
    fp8 = a_scale is not None
    dtype = FP8 if fp8 else torch.bfloat16
    names = ("a", "a_scale", "b", "b_scale", "k_offsets", "out")
    a, a_scale, b, b_scale, k_offsets, out = (None if t is None else _backend.as_tensor(n, t) for n, t in
                                              zip(names, (a, a_scale, b, b_scale, k_offsets, out)))
    check_tensor("a", a, dtypes=(dtype,), ndim=2, nonempty=False, contiguous=fp8)
    M, K_total = a.shape
    if K_total % 128:
        raise ValueError(f"a's K_total (the tokens) must be a multiple of 128 (every segment is), got {K_total}")
    check_tensor("b", b, dtypes=(dtype,), ndim=2, device=a.device, nonempty=False, contiguous=fp8)
    if b.shape[1] != K_total:
        raise ValueError(f"b must have K_total = {K_total} columns like a (out[g] = a[:, seg] @ b[:, seg].T), got "
                         f"shape {tuple(b.shape)}")
    N = b.shape[0]
    if fp8:
        for name, t, rows in (("a_scale", a_scale, M), ("b_scale", b_scale, N)):
            check_tensor(name, t, dtypes=(torch.float32,), ndim=2, device=a.device, contiguous=False, nonempty=False)
            check_shape(name, t, (rows, K_total // 128))
    check_tensor("k_offsets", k_offsets, dtypes=(torch.int32,), ndim=1, device=a.device)
    G = k_offsets.shape[0] - 1
    if G < 1:
        raise ValueError(f"k_offsets must be [G + 1] with G >= 1 groups, got shape {tuple(k_offsets.shape)}")
    check_tensor("out", out, dtypes=(torch.float32,), ndim=3, device=a.device, nonempty=False)
    check_shape("out", out, (G, M, N))
    accumulate = check_bool("accumulate", accumulate)
    name = _backend.resolve(op, backend, a.device)
    run = _backend.pick(_k_grouped, _k_grouped_op, *(t for t in (a, a_scale, b, b_scale, k_offsets, out)
                                                    if t is not None))
    run(a, a_scale, b, b_scale, k_offsets, out, accumulate, name)
    return out


def k_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, k_offsets, out, *, accumulate: bool = True,
                                     backend: str = "auto"):
    """The experts' weight gradients into out [G, M, N] fp32 (module docstring); returns out.
    backend: "auto", "cuda" (sm_90), "triton" (sm_89 and newer) or "reference"."""
    return _run_k_grouped("k_grouped_fp8_gemm", a, a_scale, b, b_scale, k_offsets, out, accumulate, backend)


def k_grouped_bf16_gemm_nt_contiguous(a, b, k_offsets, out, *, accumulate: bool = True, backend: str = "auto"):
    """The bf16 form of k_grouped_fp8_gemm_nt_contiguous: a [M, K_total] and b [N, K_total] bf16, any
    strides (dy.t() and x.t() of token-major rows, without a copy), fp32 sums; the same segment rule.
    Returns out."""
    return _run_k_grouped("k_grouped_bf16_gemm", a, None, b, None, k_offsets, out, accumulate, backend)
