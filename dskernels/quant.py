"""FP8 (E4M3) quantization: the public API.

    q, scale = per_token_group_quant(x)              x [M, K] -> [M, K] e4m3, [M, ceil(K/128)] fp32
    q_t, scale = per_token_group_quant_transposed(x) x [M, K] -> [K, M] e4m3, [K, ceil(M/128)] fp32
    q, scale, q_t, scale_t = per_token_group_quant_both(x)   both of the above from one read of x
    q, scale = per_block_quant(w)                    w [N, K] -> [N, K] e4m3, [ceil(N/128), ceil(K/128)]
    y = dequant(q, scale, block_shape=(1, 128))      back to bf16 or fp32

The numerics are specified in dskernels.reference.quant; every backend produces the same bytes.
`scale_layout="col"` returns activation scales MN-major (the storage is [ceil(K/128), M rounded up to
4], exposed as an [M, ceil(K/128)] view with strides (1, M_pad)), the layout a TMA-loading GEMM reads.
Each op is a torch.library custom op (dskernels::<name>) with a fake implementation, so it works
under torch.compile; the quantization has no gradient.
"""
import torch

from dskernels import backend as _backend
from dskernels.checks import check_bool, check_choice, check_shape, check_tensor
from dskernels.reference import quant as _ref
from dskernels.reference.quant import BLOCK, cdiv

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _scale_tensor(rows, groups, layout, device):
    """[rows, groups] fp32, row-major or MN-major with the row count padded to 4 (16 bytes)."""
    if layout == "row":
        return _backend.empty((rows, groups), torch.float32, device)
    return _backend.empty((rows, groups), torch.float32, device, strides=(1, cdiv(rows, 4) * 4))


# ---------------------------------------------------------------------------------------------
# Backends: each fills preallocated outputs.

def _reference_into(fn):
    def run(x, q, scale, pow2_scale):
        q_ref, s_ref = fn(x, pow2_scale)
        q.copy_(q_ref)
        scale.copy_(s_ref)
    return run


def _cuda_groups(x, q, scale, pow2_scale):
    _backend._C.quant_groups(x.data_ptr(), _DTYPE_CODE[x.dtype], x.shape[0], x.shape[1], x.stride(0),
                             q.data_ptr(), q.stride(0), scale.data_ptr(), scale.stride(0),
                             scale.stride(1), pow2_scale, _backend.stream(x))


def _cuda_groups_transposed(x, q_t, scale, pow2_scale):
    _backend._C.quant_groups_transposed(x.data_ptr(), _DTYPE_CODE[x.dtype], x.shape[0], x.shape[1],
                                        x.stride(0), q_t.data_ptr(), q_t.stride(0), scale.data_ptr(),
                                        scale.stride(0), scale.stride(1), pow2_scale,
                                        _backend.stream(x))


def _cuda_blocks(w, q, scale, pow2_scale):
    _backend._C.quant_blocks(w.data_ptr(), _DTYPE_CODE[w.dtype], w.shape[0], w.shape[1], w.stride(0),
                             q.data_ptr(), q.stride(0), scale.data_ptr(), scale.stride(0),
                             scale.stride(1), pow2_scale, _backend.stream(w))


def _cuda_dequant(q, scale, block_rows, out):
    _backend._C.dequant(q.data_ptr(), q.shape[0], q.shape[1], q.stride(0), scale.data_ptr(),
                        scale.stride(0), scale.stride(1), block_rows, out.data_ptr(),
                        _DTYPE_CODE[out.dtype], out.stride(0), _backend.stream(q))


def _triton(name):
    def run(*args):
        from dskernels.triton import quant as tq  # imported lazily: triton is optional
        getattr(tq, name)(*args)
    return run


def _reference_dequant(q, scale, block_rows, out):
    out.copy_(_ref.dequant(q, scale, block_rows, out.dtype))


_GROUPS = {"reference": _reference_into(_ref.per_token_group_quant),
           "triton": _triton("per_token_group_quant"), "cuda": _cuda_groups}
_GROUPS_T = {"reference": _reference_into(_ref.per_token_group_quant_transposed),
             "triton": _triton("per_token_group_quant_transposed"), "cuda": _cuda_groups_transposed}
def _reference_both(x, q, scale, q_t, scale_t, pow2_scale):
    M, K = x.shape
    q_ref, s_ref = _ref.per_token_group_quant(x, pow2_scale)
    qt_ref, st_ref = _ref.per_token_group_quant_transposed(x, pow2_scale)
    for dst, src, n in ((q, q_ref, K), (q_t, qt_ref, M)):  # then the zero padding columns, if any
        dst[:, :n].copy_(src)
        dst[:, n:].view(torch.uint8).zero_()
    scale.copy_(s_ref)
    scale_t.copy_(st_ref)


def _cuda_both(x, q, scale, q_t, scale_t, pow2_scale):
    M, K = x.shape
    _backend._C.quant_groups_both(x.data_ptr(), _DTYPE_CODE[x.dtype], M, K, x.stride(0), q.data_ptr(), q.stride(0),
                                  q.shape[1], scale.data_ptr(), scale.stride(0), scale.stride(1), q_t.data_ptr(),
                                  q_t.stride(0), q_t.shape[1], scale_t.data_ptr(), scale_t.stride(0),
                                  scale_t.stride(1), pow2_scale, _backend.stream(x))


_BOTH = {"reference": _reference_both, "triton": _triton("per_token_group_quant_both"), "cuda": _cuda_both}
_BLOCKS = {"reference": _reference_into(_ref.per_block_quant),
           "triton": _triton("per_block_quant"), "cuda": _cuda_blocks}
_DEQUANT = {"reference": _reference_dequant, "triton": _triton("dequant"), "cuda": _cuda_dequant}


# ---------------------------------------------------------------------------------------------
# The implementations: checked arguments in, fresh outputs out.

def _groups(x, pow2_scale, scale_layout, backend, transposed=False):
    """q [R, C] and its scales for x [M, K] (R, C = M, K) or x.T (R, C = K, M)."""
    R, C = x.shape[::-1] if transposed else x.shape
    q = _backend.empty((R, C), FP8, x.device)
    scale = _scale_tensor(R, cdiv(C, BLOCK), scale_layout, x.device)
    with _backend.on_device(x):
        (_GROUPS_T if transposed else _GROUPS)[backend](x, q, scale, pow2_scale)
    return q, scale


def _groups_transposed(x, pow2_scale, scale_layout, backend):
    return _groups(x, pow2_scale, scale_layout, backend, transposed=True)


def _both(x, pow2_scale, scale_layout, pad, backend):
    M, K = x.shape
    K_out, M_out = (cdiv(K, BLOCK) * BLOCK, cdiv(M, BLOCK) * BLOCK) if pad else (K, M)
    q = _backend.empty((M, K_out), FP8, x.device)
    scale = _scale_tensor(M, cdiv(K, BLOCK), scale_layout, x.device)
    q_t = _backend.empty((K, M_out), FP8, x.device)
    scale_t = _scale_tensor(K, cdiv(M, BLOCK), scale_layout, x.device)
    with _backend.on_device(x):
        _BOTH[backend](x, q, scale, q_t, scale_t, pow2_scale)
    return q, scale, q_t, scale_t


def _blocks(w, pow2_scale, backend):
    N, K = w.shape
    q = _backend.empty((N, K), FP8, w.device)
    scale = _backend.empty((cdiv(N, BLOCK), cdiv(K, BLOCK)), torch.float32, w.device)
    with _backend.on_device(w):
        _BLOCKS[backend](w, q, scale, pow2_scale)
    return q, scale


def _dequant(q, scale, block_rows, out_dtype, backend):
    out = _backend.empty(q.shape, out_dtype, q.device)
    with _backend.on_device(q):
        _DEQUANT[backend](q, scale, block_rows, out)
    return out


# ---------------------------------------------------------------------------------------------
# torch.library ops (for torch.compile, export and fake tensors): the implementations above, with fake
# implementations. In plain eager mode the public functions call the implementations directly
# (backend.eager): same work, without the dispatcher's host cost.

@torch.library.custom_op("dskernels::per_token_group_quant", mutates_args=())
def _per_token_group_quant_op(x: torch.Tensor, pow2_scale: bool, scale_layout: str,
                              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _groups(x, pow2_scale, scale_layout, backend)


@_per_token_group_quant_op.register_fake
def _(x, pow2_scale, scale_layout, backend):
    M, K = x.shape
    return torch.empty((M, K), dtype=FP8, device=x.device), \
        _scale_tensor(M, cdiv(K, BLOCK), scale_layout, x.device)


@torch.library.custom_op("dskernels::per_token_group_quant_transposed", mutates_args=())
def _per_token_group_quant_transposed_op(x: torch.Tensor, pow2_scale: bool, scale_layout: str,
                                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _groups_transposed(x, pow2_scale, scale_layout, backend)


@_per_token_group_quant_transposed_op.register_fake
def _(x, pow2_scale, scale_layout, backend):
    M, K = x.shape
    return torch.empty((K, M), dtype=FP8, device=x.device), \
        _scale_tensor(K, cdiv(M, BLOCK), scale_layout, x.device)


@torch.library.custom_op("dskernels::per_token_group_quant_both", mutates_args=())
def _per_token_group_quant_both_op(x: torch.Tensor, pow2_scale: bool, scale_layout: str, pad: bool,
                                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _both(x, pow2_scale, scale_layout, pad, backend)


@_per_token_group_quant_both_op.register_fake
def _(x, pow2_scale, scale_layout, pad, backend):
    M, K = x.shape
    K_out, M_out = (cdiv(K, BLOCK) * BLOCK, cdiv(M, BLOCK) * BLOCK) if pad else (K, M)
    return torch.empty((M, K_out), dtype=FP8, device=x.device), \
        _scale_tensor(M, cdiv(K, BLOCK), scale_layout, x.device), \
        torch.empty((K, M_out), dtype=FP8, device=x.device), _scale_tensor(K, cdiv(M, BLOCK), scale_layout, x.device)


@torch.library.custom_op("dskernels::per_block_quant", mutates_args=())
def _per_block_quant_op(w: torch.Tensor, pow2_scale: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _blocks(w, pow2_scale, backend)


@_per_block_quant_op.register_fake
def _(w, pow2_scale, backend):
    N, K = w.shape
    return torch.empty((N, K), dtype=FP8, device=w.device), \
        torch.empty((cdiv(N, BLOCK), cdiv(K, BLOCK)), dtype=torch.float32, device=w.device)


@torch.library.custom_op("dskernels::dequant", mutates_args=())
def _dequant_op(q: torch.Tensor, scale: torch.Tensor, block_rows: int, out_dtype: torch.dtype,
                backend: str) -> torch.Tensor:
    return _dequant(q, scale, block_rows, out_dtype, backend)


@_dequant_op.register_fake
def _(q, scale, block_rows, out_dtype, backend):
    return torch.empty(q.shape, dtype=out_dtype, device=q.device)


# ---------------------------------------------------------------------------------------------
# Public API.

def _check_input(name, x, pow2_scale, scale_layout="row"):
    x = _backend.as_tensor(name, x)
    check_tensor(name, x, dtypes=INPUT_DTYPES, ndim=2)
    check_bool("pow2_scale", pow2_scale)
    check_choice("scale_layout", scale_layout, ("row", "col"))
    return x


def per_token_group_quant(x, *, pow2_scale: bool = False, scale_layout: str = "row",
                          backend: str = "auto"):
    """Quantize activations to e4m3 with one fp32 scale per 1 x 128 tile along K.

    x: [M, K] float32/bfloat16/float16, contiguous, on any device; K need not be a multiple of 128.
    Returns q [M, K] float8_e4m3fn and scale [M, ceil(K/128)] float32 (scale_layout "row":
    row-major; "col": MN-major, see the module docstring). pow2_scale rounds each scale up to a
    power of two. Dequantize: q * scale per tile (dequant). NaN elements quantize to NaN; an Inf
    makes its tile's scale Inf (the tile dequantizes to NaN).
    """
    return groups_unchecked(_check_input("x", x, pow2_scale, scale_layout), pow2_scale, scale_layout, backend)


def per_token_group_quant_transposed(x, *, pow2_scale: bool = False, scale_layout: str = "row",
                                     backend: str = "auto"):
    """Quantize x.T per 1 x 128 tile, i.e. x [M, K] in tiles of 128 x 1 along M, for GEMMs that
    reduce over tokens (the weight gradient dW = dy.T @ x).

    x: [M, K] as in per_token_group_quant. Returns q_t [K, M] float8_e4m3fn (contiguous, the
    transpose of x quantized) and scale [K, ceil(M/128)] float32. Equal, byte for byte, to
    per_token_group_quant(x.T.contiguous()) but reads x once.
    """
    x = _check_input("x", x, pow2_scale, scale_layout)
    return groups_transposed_unchecked(x, pow2_scale, scale_layout, backend)


def per_token_group_quant_both(x, *, pow2_scale: bool = False, scale_layout: str = "row", pad: bool = False,
                               backend: str = "auto"):
    """per_token_group_quant(x) and per_token_group_quant_transposed(x) from one read of x: what a
    Linear layer's forward and weight gradient need of its input (and its backward of the output gradient).

    Returns q [M, K], scale [M, ceil(K/128)], q_t [K, M], scale_t [K, ceil(M/128)], each byte for byte as
    the two ops return them. pad=True appends zero columns up to a multiple of 128: q [M, K rounded up]
    and q_t [K, M rounded up], ready for fp8_gemm, which reduces over those dims (zeros add nothing and no
    scale changes). scale_layout applies to both scales.
    """
    x = _check_input("x", x, pow2_scale, scale_layout)
    return both_unchecked(x, pow2_scale, scale_layout, check_bool("pad", pad), backend)


def per_block_quant(w, *, pow2_scale: bool = False, backend: str = "auto"):
    """Quantize weights to e4m3 with one fp32 scale per 128 x 128 block.

    w: [N, K] float32/bfloat16/float16, contiguous. Returns q [N, K] float8_e4m3fn and
    scale [ceil(N/128), ceil(K/128)] float32 (row-major).
    """
    return blocks_unchecked(_check_input("w", w, pow2_scale), pow2_scale, backend)


def dequant(q, scale, *, block_shape=(1, 128), out_dtype=torch.bfloat16, backend: str = "auto"):
    """q * scale, broadcasting each scale over its tile.

    q: [R, C] float8_e4m3fn, contiguous. block_shape: (1, 128) for per-token-group scales
    (scale [R, ceil(C/128)], either layout) or (128, 128) for per-block scales
    (scale [ceil(R/128), ceil(C/128)]). out_dtype: torch.bfloat16 or torch.float32.
    """
    q = _backend.as_tensor("q", q)
    scale = _backend.as_tensor("scale", scale)
    check_tensor("q", q, dtypes=(FP8,), ndim=2)
    check_tensor("scale", scale, dtypes=(torch.float32,), ndim=2, device=q.device, contiguous=False)
    if not isinstance(block_shape, (tuple, list)):
        raise TypeError(f"block_shape must be a tuple, (1, 128) or (128, 128); got {type(block_shape).__name__}")
    check_choice("block_shape", tuple(block_shape), ((1, 128), (128, 128)))
    check_choice("out_dtype", out_dtype, (torch.bfloat16, torch.float32))
    R, C = q.shape
    check_shape("scale", scale, (cdiv(R, block_shape[0]), cdiv(C, BLOCK)))
    name = _backend.resolve("dequant", backend, q.device)
    return _backend.pick(_dequant, _dequant_op, q, scale)(q, scale, block_shape[0], out_dtype, name)


# ---------------------------------------------------------------------------------------------
# The public functions' work once their arguments are checked, also called directly by dskernels' own
# layers (dskernels.linear), whose arguments satisfy every rule already (a check costs host time on every
# call). Each resolves the backend (raising before any launch) and runs the implementation directly in
# plain eager mode, else the custom op.

def groups_unchecked(x, pow2_scale, scale_layout, backend):
    name = _backend.resolve("per_token_group_quant", backend, x.device)
    return _backend.pick(_groups, _per_token_group_quant_op, x)(x, pow2_scale, scale_layout, name)


def groups_transposed_unchecked(x, pow2_scale, scale_layout, backend):
    name = _backend.resolve("per_token_group_quant_transposed", backend, x.device)
    return _backend.pick(_groups_transposed, _per_token_group_quant_transposed_op, x)(x, pow2_scale, scale_layout,
                                                                                      name)


def both_unchecked(x, pow2_scale, scale_layout, pad, backend):
    name = _backend.resolve("per_token_group_quant_both", backend, x.device)
    return _backend.pick(_both, _per_token_group_quant_both_op, x)(x, pow2_scale, scale_layout, pad, name)


def blocks_unchecked(w, pow2_scale, backend):
    name = _backend.resolve("per_block_quant", backend, w.device)
    return _backend.pick(_blocks, _per_block_quant_op, w)(w, pow2_scale, name)


def blocks_both_unchecked(w, pow2_scale, pad, backend):
    """per_block_quant of w [N, K] and its transpose from one read of w: [q, scale, q_t, scale_t] with q_t
    [K, N (rounded up to 128 with zero columns when pad)] = q^T and scale_t = scale^T (the same blocks),
    by the CUDA kernel in plain eager mode; None elsewhere (the caller then transposes per_block_quant's
    result: the same bytes)."""
    name = _backend.resolve("per_block_quant", backend, w.device)
    if name != "cuda" or not _backend.eager(w):
        return None
    N, K = w.shape
    N_out = cdiv(N, BLOCK) * BLOCK if pad else N
    q = _backend.empty((N, K), FP8, w.device)
    scale = _backend.empty((cdiv(N, BLOCK), cdiv(K, BLOCK)), torch.float32, w.device)
    q_t = _backend.empty((K, N_out), FP8, w.device)
    scale_t = _backend.empty((cdiv(K, BLOCK), cdiv(N, BLOCK)), torch.float32, w.device)
    with _backend.on_device(w):
        _backend._C.quant_blocks_both(w.data_ptr(), _DTYPE_CODE[w.dtype], N, K, w.stride(0), q.data_ptr(), q.stride(0),
                                      scale.data_ptr(), scale.stride(0), scale.stride(1), q_t.data_ptr(), q_t.stride(0),
                                      N_out, scale_t.data_ptr(), scale_t.stride(0), scale_t.stride(1), pow2_scale,
                                      _backend.stream(w))
    return [q, scale, q_t, scale_t]
