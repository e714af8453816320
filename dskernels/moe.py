"""A DeepSeekMoE layer's routing and data movement: the public API.

    topk_idx, topk_weights, counts = route(logits, bias, topk, n_group=8, topk_group=4, route_scale=2.5)
    layout = contiguous_layout(topk_idx, num_experts)      # expert-sorted rows, segments aligned to 128
    layout = masked_layout(topk_idx, num_experts)          # or decode's: E segments of T rows
    x_rows = permute(x, layout)                            # [rows, D] bf16, differentiable
    q, scale = permute_fp8(x, layout)                      # the same rows as e4m3 with 1 x 128 scales
    ... the experts: dskernels.grouped_gemm over layout.m_indices ...
    y = combine(y_rows, layout, topk_weights)              # [T, D], differentiable w.r.t. both
    update_bias(bias, counts, gamma=0.001)                 # auxiliary-loss-free balancing, in place
    y, counts = moe_forward(x, gate_weight, bias, w13, w2, topk, ...)   # the MoE module's layer as a function

The numerics are specified in dskernels.reference.moe (ties, slot order, fp32 sums, the backwards).
Memory: no token is ever dropped and no host sync sizes anything, so a layout holds
layout_rows(T, k, E) = T * k + E * 127 rows rounded up to 128 (the worst case of every expert's segment
padded to 128): at T = 4096, k = 8, E = 256 that is 65,280 rows, 1.99x T * k (with 32 local experts,
the expert-parallel case, 36,864: 1.12x); permute's output is that many rows of D elements. Padding
rows of a permute are zero (the weight gradient sums over them).

Backends: the reference (PyTorch ops, on any device, without a host sync) and Triton on a GPU for every
step: the routing's choice (its weights are PyTorch ops on the chosen affinities, the reference's bits),
the layout (three launches, contiguous or masked), permute, FP8 permute, combine and the backwards. Each
kernel launch is a torch.library custom op under tracing (torch.compile), called directly in eager mode.
A layout is trusted as contiguous_layout or masked_layout made it: the kernels never read out of bounds,
but a corrupted one gives NaN rows, not an exception (checking it would cost a sync).
"""
import torch

from dskernels import backend as _backend
from dskernels.checks import check_bool, check_choice, check_int, check_real, check_shape, check_tensor
from dskernels.quant import _scale_tensor
from dskernels.reference import moe as _ref
from dskernels.reference import quant as _ref_quant
from dskernels.reference.moe import Layout, layout_rows, update_bias
from dskernels.reference.quant import BLOCK, cdiv

FP8 = torch.float8_e4m3fn
DATA_DTYPES = (torch.bfloat16, torch.float32)

__all__ = ["Layout", "route", "contiguous_layout", "masked_layout", "layout_rows", "permute", "permute_fp8", "combine",
           "update_bias", "swiglu", "quantize_experts", "experts", "moe_forward", "MoE"]


# ---------------------------------------------------------------------------------------------
# Routing and layout.

def _triton(kernel: str, on, *args):
    """dskernels.triton.moe.<kernel>(*args) on the GPU of the tensor `on` (triton imported lazily: optional)."""
    from dskernels.triton import moe as tm
    with _backend.on_device(on):
        getattr(tm, kernel)(*args)


def route(logits, bias, topk: int, *, n_group: int = 1, topk_group: int = 1, route_scale: float = 1.0,
          score: str = "sigmoid", backend: str = "auto"):
    """logits [T, E] (the gate's output; the affinities are taken here) -> topk_idx [T, topk] int32,
    topk_weights [T, topk] fp32 (differentiable w.r.t. logits), counts [E] int32 on the device.
    bias [E] (or None) steers the choice only; groups: E splits into n_group groups, of which each token
    keeps topk_group (ranked by the sum of their two best biased affinities)."""
    logits = _backend.as_tensor("logits", logits)
    check_tensor("logits", logits, dtypes=(torch.float32, torch.bfloat16, torch.float16), ndim=2, nonempty=False,
                 contiguous=False)
    T, E = logits.shape
    if E == 0:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    if bias is not None:
        bias = _backend.as_tensor("bias", bias)
        check_tensor("bias", bias, dtypes=(torch.float32, torch.bfloat16), ndim=1, device=logits.device,
                     contiguous=False)
        check_shape("bias", bias, (E,))
    n_group = check_int("n_group", n_group, minimum=1)
    if E % n_group:
        raise ValueError(f"n_group must divide the {E} experts, got n_group = {n_group}")
    topk_group = check_int("topk_group", topk_group, minimum=1)
    if topk_group > n_group:
        raise ValueError(f"topk_group must be <= n_group = {n_group}, got {topk_group}")
    if n_group > 1 and bias is not None and E // n_group < 2:
        raise ValueError(f"groups must hold at least 2 experts (a group scores its two best), got {E // n_group}")
    topk = check_int("topk", topk, minimum=1)
    if topk > topk_group * (E // n_group):
        raise ValueError(f"topk must be <= the experts of the kept groups, topk_group * E / n_group = "
                         f"{topk_group * (E // n_group)}, got {topk}")
    route_scale = check_real("route_scale", route_scale, positive=True)
    check_choice("score", score, ("sigmoid", "softmax"))
    name = _backend.resolve("moe_route", backend, logits.device)
    if name == "reference":
        return _ref.route(logits, bias, topk, n_group, topk_group, route_scale, score)
    s = logits.float().sigmoid() if score == "sigmoid" else logits.float().softmax(dim=-1)
    idx = _backend.empty((T, topk), torch.int32, logits.device)
    counts = _backend.empty((E,), torch.int32, logits.device)
    bias32 = None if bias is None else bias.float().contiguous()
    sd = s.detach().contiguous()
    tensors = (sd, idx, counts) if bias32 is None else (sd, bias32, idx, counts)
    _backend.pick(_route_choice, _route_choice_op, *tensors)(sd, bias32, topk, n_group, topk_group, idx, counts)
    weights = s.gather(1, idx.long())  # the reference's operations from here: its bits, and its gradient
    if score == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return idx, weights * route_scale, counts


def _route_choice(s, bias, topk, n_group, topk_group, idx, counts):
    _triton("route_choice", s, s, bias, topk, n_group, topk_group, idx, counts)


@torch.library.custom_op("dskernels::moe_route_choice", mutates_args=("idx", "counts"))
def _route_choice_op(s: torch.Tensor, bias: torch.Tensor | None, topk: int, n_group: int, topk_group: int,
                     idx: torch.Tensor, counts: torch.Tensor) -> None:
    _route_choice(s, bias, topk, n_group, topk_group, idx, counts)


@_route_choice_op.register_fake
def _(s, bias, topk, n_group, topk_group, idx, counts):
    return None


def contiguous_layout(topk_idx, num_experts: int, *, backend: str = "auto") -> Layout:
    """The expert-sorted rows of topk_idx [T, k] int32 (dskernels.reference.moe.Layout): m_indices for the
    grouped GEMMs, the gathers both ways, each expert's segment start and row count, all on the device.
    The Triton kernels give an id outside [0, num_experts) no row (row_of_slot -1: its token's combine
    comes back NaN); the reference raises on one."""
    return _make_layout(topk_idx, num_experts, False, backend)


def masked_layout(topk_idx, num_experts: int, *, backend: str = "auto") -> Layout:
    """The masked grouped GEMMs' layout (decode, CUDA graphs): num_experts * T rows, expert e's from e * T
    (permute's output viewed as [num_experts, T, D]), counts = masked_m; otherwise as contiguous_layout.
    A token's k experts must be distinct (route's are): T rows then hold any expert's slots. Where a token
    names one twice, an expert's slots past its T rows get no row (row_of_slot -1: their tokens' combine
    comes back NaN) and its count exceeds T (the masked GEMMs clamp it). It takes E / k times the rows a
    token's k slots need: at T = 64 tokens of 256 experts 16,384 rows (the contiguous layout's worst case
    is 33,024 at any T this small)."""
    return _make_layout(topk_idx, num_experts, True, backend)


def _make_layout(topk_idx, num_experts, masked, backend):
    topk_idx = _backend.as_tensor("topk_idx", topk_idx)
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int32, torch.int64), ndim=2, nonempty=False, contiguous=False)
    num_experts = check_int("num_experts", num_experts, minimum=1)
    name = _backend.resolve("moe_layout", backend, topk_idx.device)
    if name == "reference":
        return (_ref.masked_layout if masked else _ref.contiguous_layout)(topk_idx, num_experts)
    idx = topk_idx.to(torch.int32).contiguous()
    T, k = idx.shape
    device = idx.device
    rows = num_experts * T if masked else layout_rows(T, k, num_experts)
    m_indices, token_of_row = (_backend.empty((rows,), torch.int32, device) for _ in range(2))
    row_of_slot = _backend.empty((T, k), torch.int32, device)
    segment_start, counts = (_backend.empty((num_experts,), torch.int32, device) for _ in range(2))
    from dskernels.triton.moe import LAYOUT_BLOCK
    workspace = _backend.empty((2, max(1, cdiv(T * k, LAYOUT_BLOCK)), num_experts), torch.int32, device)
    outs = (m_indices, token_of_row, row_of_slot, segment_start, counts, workspace)
    stride = T if masked else 0
    _backend.pick(_layout, _layout_op, idx, *outs)(idx, num_experts, stride, *outs)
    return Layout(m_indices, token_of_row, row_of_slot, segment_start, counts, masked)


def _layout(topk_idx, num_experts, stride, m_indices, token_of_row, row_of_slot, segment_start, counts, workspace):
    _triton("layout", topk_idx, topk_idx, num_experts, _ref.ALIGNMENT, stride, m_indices, token_of_row,
            row_of_slot, segment_start, counts, workspace)


@torch.library.custom_op("dskernels::moe_layout", mutates_args=("m_indices", "token_of_row", "row_of_slot",
                                                                "segment_start", "counts", "workspace"))
def _layout_op(topk_idx: torch.Tensor, num_experts: int, stride: int, m_indices: torch.Tensor,
               token_of_row: torch.Tensor, row_of_slot: torch.Tensor, segment_start: torch.Tensor,
               counts: torch.Tensor, workspace: torch.Tensor) -> None:
    _layout(topk_idx, num_experts, stride, m_indices, token_of_row, row_of_slot, segment_start, counts, workspace)


@_layout_op.register_fake
def _(topk_idx, num_experts, stride, m_indices, token_of_row, row_of_slot, segment_start, counts, workspace):
    return None


# ---------------------------------------------------------------------------------------------
# Permute and combine: the implementations (each fills preallocated outputs) and their custom ops.

def _partial_layout(token_of_row, row_of_slot):
    return Layout(None, token_of_row, row_of_slot, None, None)


def _write_rows(rows, out, scale, pow2_scale):
    """The reference's rows into out as they are, or quantized per 1 x 128 (out e4m3 and scale) when scale is
    given."""
    if scale is None:
        out.copy_(rows)
    else:
        q, s = _ref_quant.per_token_group_quant(rows, pow2_scale)
        out.copy_(q)
        scale.copy_(s)


def _permute(x, token_of_row, out, scale, pow2_scale, backend):
    if not out.numel():
        return
    if backend == "reference":
        _write_rows(_ref.permute(x, _partial_layout(token_of_row, None)), out, scale, pow2_scale)
        return
    _triton("permute", x, x, token_of_row, out, scale, pow2_scale)


@torch.library.custom_op("dskernels::moe_permute", mutates_args=("out", "scale"))
def _permute_op(x: torch.Tensor, token_of_row: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None,
                pow2_scale: bool, backend: str) -> None:
    _permute(x, token_of_row, out, scale, pow2_scale, backend)


@_permute_op.register_fake
def _(x, token_of_row, out, scale, pow2_scale, backend):
    return None


def _combine(y, row_of_slot, weights, out, backend):
    if not out.numel():
        return
    if backend == "reference":
        out.copy_(_ref.combine(y, _partial_layout(None, row_of_slot), weights))
        return
    _triton("combine", y, y, row_of_slot, weights, out)


@torch.library.custom_op("dskernels::moe_combine", mutates_args=("out",))
def _combine_op(y: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor,
                backend: str) -> None:
    _combine(y, row_of_slot, weights, out, backend)


@_combine_op.register_fake
def _(y, row_of_slot, weights, out, backend):
    return None


def _combine_backward(grad, y, token_of_row, row_of_slot, weights, grad_y, grad_weights, backend):
    if backend == "reference":
        gy, gw = _ref.combine_backward(grad, y, _partial_layout(token_of_row, row_of_slot), weights)
        grad_y.copy_(gy)
        grad_weights.copy_(gw)
        return
    if not grad_y.numel():
        grad_weights.zero_()  # (no rows: no slots either, unless D == 0)
        return
    _triton("combine_backward", y, grad, y, token_of_row, row_of_slot, weights, grad_y, grad_weights)


@torch.library.custom_op("dskernels::moe_combine_backward", mutates_args=("grad_y", "grad_weights"))
def _combine_backward_op(grad: torch.Tensor, y: torch.Tensor, token_of_row: torch.Tensor, row_of_slot: torch.Tensor,
                         weights: torch.Tensor, grad_y: torch.Tensor, grad_weights: torch.Tensor,
                         backend: str) -> None:
    _combine_backward(grad, y, token_of_row, row_of_slot, weights, grad_y, grad_weights, backend)


@_combine_backward_op.register_fake
def _(grad, y, token_of_row, row_of_slot, weights, grad_y, grad_weights, backend):
    return None


def _run_combine(y, row_of_slot, weights, backend):
    out = _backend.empty((row_of_slot.shape[0], y.shape[1]), y.dtype, y.device)
    tensors = (y, row_of_slot, out) if weights is None else (y, row_of_slot, weights, out)
    _backend.pick(_combine, _combine_op, *tensors)(y, row_of_slot, weights, out, backend)
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_of_row, row_of_slot, backend):
        out = _backend.empty((token_of_row.shape[0], x.shape[1]), x.dtype, x.device)
        _backend.pick(_permute, _permute_op, x, token_of_row, out)(x, token_of_row, out, None, False, backend)
        ctx.save_for_backward(row_of_slot)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad):
        (row_of_slot,) = ctx.saved_tensors
        return _run_combine(grad.contiguous(), row_of_slot, None, ctx.backend), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, token_of_row, row_of_slot, backend):
        ctx.save_for_backward(y, weights, token_of_row, row_of_slot)
        ctx.backend = backend
        return _run_combine(y, row_of_slot, weights, backend)

    @staticmethod
    def backward(ctx, grad):
        y, weights, token_of_row, row_of_slot = ctx.saved_tensors
        grad = grad.contiguous()
        grad_y = _backend.empty(y.shape, y.dtype, y.device)
        grad_weights = _backend.empty(weights.shape, torch.float32, y.device)
        _backend.pick(_combine_backward, _combine_backward_op, grad, y, token_of_row, row_of_slot, weights, grad_y,
                      grad_weights)(grad, y, token_of_row, row_of_slot, weights, grad_y, grad_weights, ctx.backend)
        return grad_y, grad_weights.to(weights.dtype), None, None, None


# ---------------------------------------------------------------------------------------------
# Checks and the public functions.

def _check_layout(layout, device, T=None):
    """layout's tensors: int32 on x's device, row_of_slot [T, k] (T: x's tokens, when given)."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a dskernels.moe.Layout (from contiguous_layout or masked_layout), got "
                        f"{type(layout).__name__}")
    check_tensor("layout.token_of_row", layout.token_of_row, dtypes=(torch.int32,), ndim=1, device=device,
                 nonempty=False)
    check_tensor("layout.row_of_slot", layout.row_of_slot, dtypes=(torch.int32,), ndim=2, device=device,
                 nonempty=False)
    if T is not None and layout.row_of_slot.shape[0] != T:
        raise ValueError(f"layout.row_of_slot must have one row per token of x, T = {T}, got shape "
                         f"{tuple(layout.row_of_slot.shape)}")


def _check_x(x, dtypes, layout):
    x = _backend.as_tensor("x", x)
    check_tensor("x", x, dtypes=dtypes, ndim=2, nonempty=False)
    _check_layout(layout, x.device, x.shape[0])
    return x


def permute(x, layout: Layout, *, backend: str = "auto"):
    """x [T, D] (bf16 or fp32) -> [rows, D]: row r holds x[layout.token_of_row[r]], padding rows zero.
    Differentiable: the gradient is the unweighted combine of the rows' gradients."""
    x = _check_x(x, DATA_DTYPES, layout)
    name = _backend.resolve("moe_permute", backend, x.device)
    return _Permute.apply(x, layout.token_of_row, layout.row_of_slot, name)


def permute_fp8(x, layout: Layout, *, pow2_scale: bool = False, scale_layout: str = "row", backend: str = "auto"):
    """permute fused with per_token_group_quant: q [rows, D] e4m3 and scale [rows, ceil(D/128)] fp32
    (scale_layout "row" or "col" as per_token_group_quant takes them), the bytes of quantizing
    permute(x, layout); padding rows are zero bytes. No gradient (an FP8 layer quantizes its input)."""
    x = _check_x(x, DATA_DTYPES + (torch.float16,), layout)
    check_bool("pow2_scale", pow2_scale)
    check_choice("scale_layout", scale_layout, ("row", "col"))
    name = _backend.resolve("moe_permute_fp8", backend, x.device)
    rows, D = layout.token_of_row.shape[0], x.shape[1]
    q = _backend.empty((rows, D), FP8, x.device)
    scale = _scale_tensor(rows, cdiv(D, BLOCK), scale_layout, x.device)
    _backend.pick(_permute, _permute_op, x, layout.token_of_row, q, scale)(x, layout.token_of_row, q, scale,
                                                                            pow2_scale, name)
    return q, scale


def combine(y, layout: Layout, topk_weights, *, backend: str = "auto"):
    """y [rows, D] (bf16 or fp32: the experts' outputs in layout order) -> [T, D] in y's dtype: token t's
    sum over its slots j, in slot order and fp32, of topk_weights[t, j] * y[layout.row_of_slot[t, j]].
    Differentiable w.r.t. y and topk_weights [T, k] (fp32 or bf16)."""
    y = _backend.as_tensor("y", y)
    check_tensor("y", y, dtypes=DATA_DTYPES, ndim=2, nonempty=False)
    _check_layout(layout, y.device)
    if y.shape[0] != layout.token_of_row.shape[0]:
        raise ValueError(f"y must have the layout's {layout.token_of_row.shape[0]} rows, got shape {tuple(y.shape)}")
    topk_weights = _backend.as_tensor("topk_weights", topk_weights)
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32, torch.bfloat16), ndim=2, device=y.device,
                 nonempty=False)
    check_shape("topk_weights", topk_weights, tuple(layout.row_of_slot.shape))
    name = _backend.resolve("moe_combine", backend, y.device)
    return _Combine.apply(y, topk_weights, layout.token_of_row, layout.row_of_slot, name)


# ---------------------------------------------------------------------------------------------
# The expert MLP: gate and up fused (w13 [G, 2I, D]), SwiGLU, down (w2 [G, D, I]), over the layout's rows.

def _swiglu(h, token_of_row, out, scale, pow2_scale, backend):
    if backend == "reference":
        _write_rows(_ref.swiglu(h, token_of_row), out, scale, pow2_scale)
        return
    _triton("swiglu", h, h, token_of_row, out, scale, pow2_scale)


@torch.library.custom_op("dskernels::moe_swiglu", mutates_args=("out", "scale"))
def _swiglu_op(h: torch.Tensor, token_of_row: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None,
               pow2_scale: bool, backend: str) -> None:
    _swiglu(h, token_of_row, out, scale, pow2_scale, backend)


@_swiglu_op.register_fake
def _(h, token_of_row, out, scale, pow2_scale, backend):
    return None


def _swiglu_backward(h, grad, token_of_row, grad_h, backend):
    if backend == "reference":
        grad_h.copy_(_ref.swiglu_backward(h, grad, token_of_row))
        return
    _triton("swiglu_backward", h, h, grad, token_of_row, grad_h)


@torch.library.custom_op("dskernels::moe_swiglu_backward", mutates_args=("grad_h",))
def _swiglu_backward_op(h: torch.Tensor, grad: torch.Tensor, token_of_row: torch.Tensor, grad_h: torch.Tensor,
                        backend: str) -> None:
    _swiglu_backward(h, grad, token_of_row, grad_h, backend)


@_swiglu_backward_op.register_fake
def _(h, grad, token_of_row, grad_h, backend):
    return None


def swiglu(h, token_of_row, *, fp8: bool = False, pow2_scale: bool = False, backend: str = "auto"):
    """act [rows, I] = silu(h[:, :I]) * h[:, I:] from the w13 GEMM's output h [rows, 2I] bf16, in fp32 and
    then rounded to bf16, or quantized (fp8=True: e4m3 with 1 x 128 scales, MN-major, for the w2 GEMM);
    padding rows (token_of_row -1) are zero, whatever h holds there. No gradient (experts() has it)."""
    h = _backend.as_tensor("h", h)
    check_tensor("h", h, dtypes=(torch.bfloat16,), ndim=2, nonempty=False)
    check_tensor("token_of_row", token_of_row, dtypes=(torch.int32,), ndim=1, device=h.device, nonempty=False)
    if h.shape[1] % 2 or token_of_row.shape[0] != h.shape[0]:
        raise ValueError(f"h must be [rows, 2I] with token_of_row's {token_of_row.shape[0]} rows, got "
                         f"{tuple(h.shape)}")
    check_bool("fp8", fp8)
    check_bool("pow2_scale", pow2_scale)
    name = _backend.resolve("moe_swiglu_fp8" if fp8 else "moe_swiglu", backend, h.device)
    rows, I = h.shape[0], h.shape[1] // 2
    out = _backend.empty((rows, I), FP8 if fp8 else torch.bfloat16, h.device)
    scale = _scale_tensor(rows, cdiv(I, BLOCK), "col", h.device) if fp8 else None
    tensors = (h, token_of_row, out) if scale is None else (h, token_of_row, out, scale)
    _backend.pick(_swiglu, _swiglu_op, *tensors)(h, token_of_row, out, scale, pow2_scale, name)
    return (out, scale) if fp8 else out


def _k_offsets(layout):
    """[G + 1] int32: the segments' starts and the last one's end (each padded to the alignment)."""
    end = layout.segment_start[-1:] + (layout.counts[-1:] + _ref.ALIGNMENT - 1) // _ref.ALIGNMENT * _ref.ALIGNMENT
    return torch.cat([layout.segment_start, end]).to(torch.int32)


def quantize_experts(w13, w2, *, backend: str = "auto"):
    """The experts' FP8 copies for experts(fp8=True): w13 [G, 2I, D] and w2 [G, D, I] per 128 x 128 block,
    each with its per-expert transpose (the input gradient's operand), as a list [w13 q, s, w13^T q, s, w2 q,
    s, w2^T q, s]. An MoE module keeps it between optimizer steps."""
    from dskernels.linear import quantize_weight
    out = []
    for w in (w13, w2):
        G, N, K = w.shape
        q, s, q_t, s_t = quantize_weight(w.reshape(G * N, K), transposed=True, backend=backend)
        out += [q.view(G, N, K), s.view(G, N // BLOCK, K // BLOCK),
                q_t.view(K, G, N).transpose(0, 1).contiguous(),
                s_t.view(K // BLOCK, G, N // BLOCK).transpose(0, 1).contiguous()]
    return out


def _expert_gemm(a, a_scale, w, w_scale, layout, backend):
    """[rows, N] bf16 = a's rows times their experts' w [G, N, K]^T: the contiguous grouped GEMM, or the masked
    one over a's [G, T, K] view (FP8 when a_scale is given)."""
    from dskernels import grouped_gemm as gg
    fp8 = a_scale is not None
    if not layout.masked:
        if fp8:
            return gg.m_grouped_fp8_gemm_nt_contiguous(a, a_scale, w, w_scale, layout.m_indices, backend=backend)
        return gg.m_grouped_bf16_gemm_nt_contiguous(a, w, layout.m_indices, backend=backend)
    G, T, k = w.shape[0], layout.row_of_slot.shape[0], layout.row_of_slot.shape[1]
    a3, expected_m = a.view(G, T, a.shape[1]), cdiv(T * k, G)
    if fp8:
        out = gg.m_grouped_fp8_gemm_nt_masked(a3, a_scale.view(G, T, a_scale.shape[1]), w, w_scale, layout.counts,
                                              expected_m, backend=backend)
    else:
        out = gg.m_grouped_bf16_gemm_nt_masked(a3, w, layout.counts, expected_m, backend=backend)
    return out.view(G * T, w.shape[1])


class _Experts(torch.autograd.Function):
    """y_rows = w2 SwiGLU(w13 x_rows) per expert over the layout's rows, forward and backward through the
    grouped GEMMs (FP8 with DeepSeek-V3's recipe, or BF16); padding rows of y are left unwritten. A masked
    layout runs the forward only (experts() refuses it where a gradient is wanted)."""

    @staticmethod
    def forward(ctx, x, w13, w2, layout_tensors, masked, fp8, quantized, backend):
        layout = Layout(*layout_tensors, masked)
        b = backend
        if fp8:
            w13q, w13s, _, _, w2q, w2s, _, _ = quantized
            xq, xs = permute_fp8(x, layout, scale_layout="col", backend=b)
            h = _expert_gemm(xq, xs, w13q, w13s, layout, b)
            aq, as_ = swiglu(h, layout.token_of_row, fp8=True, backend=b)
            y = _expert_gemm(aq, as_, w2q, w2s, layout, b)
        else:
            h = _expert_gemm(permute(x, layout, backend=b), None, w13.to(torch.bfloat16), None, layout, b)
            y = _expert_gemm(swiglu(h, layout.token_of_row, backend=b), None, w2.to(torch.bfloat16), None, layout, b)
        if not masked:
            ctx.save_for_backward(x, w13, w2, h, *layout_tensors)
        ctx.fp8, ctx.quantized, ctx.backend = fp8, quantized, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        from dskernels import grouped_gemm as gg
        from dskernels.quant import per_token_group_quant_both, per_token_group_quant_transposed
        x, w13, w2, h, *layout_tensors = ctx.saved_tensors
        layout = Layout(*layout_tensors)
        token_of_row = layout.token_of_row
        b, k_offsets = ctx.backend, _k_offsets(layout)
        G, two_i, D = w13.shape
        # [rows, D]; zero on padding rows whoever consumed y (combine's gradient is; the reductions need it)
        dy = torch.where((token_of_row >= 0)[:, None], dy, torch.zeros((), dtype=dy.dtype, device=dy.device))
        act = swiglu(h, token_of_row, backend=b)  # recomputed in bf16: the w2 gradient's operand
        x_rows = permute(x.detach(), layout, backend=b)
        dw13 = _backend.empty((G, two_i, D), torch.float32, x.device)  # (every group written: accumulate=False)
        dw2 = _backend.empty((G, D, two_i // 2), torch.float32, x.device)
        if ctx.fp8:
            _, _, w13tq, w13ts, _, _, w2tq, w2ts = ctx.quantized
            dyq, dys, dytq, dyts = per_token_group_quant_both(dy, scale_layout="col", backend=b)
            d_act = _expert_gemm(dyq, dys, w2tq, w2ts, layout, b)
            atq, ats = per_token_group_quant_transposed(act, scale_layout="col", backend=b)
            gg.k_grouped_fp8_gemm_nt_contiguous(dytq, dyts, atq, ats, k_offsets, dw2, accumulate=False, backend=b)
            dh = _run_swiglu_backward(h, d_act, token_of_row, _backend.resolve("moe_swiglu", b, h.device))
            dhq, dhs, dhtq, dhts = per_token_group_quant_both(dh, scale_layout="col", backend=b)
            dx_rows = _expert_gemm(dhq, dhs, w13tq, w13ts, layout, b)
            xtq, xts = per_token_group_quant_transposed(x_rows, scale_layout="col", backend=b)
            gg.k_grouped_fp8_gemm_nt_contiguous(dhtq, dhts, xtq, xts, k_offsets, dw13, accumulate=False, backend=b)
        else:
            # (the BF16 grouped GEMMs read the transposed operands by their strides: no copies)
            w13t = w13.to(torch.bfloat16).transpose(1, 2)
            w2t = w2.to(torch.bfloat16).transpose(1, 2)
            d_act = _expert_gemm(dy, None, w2t, None, layout, b)
            gg.k_grouped_bf16_gemm_nt_contiguous(dy.t(), act.t(), k_offsets, dw2, accumulate=False, backend=b)
            dh = _run_swiglu_backward(h, d_act, token_of_row, _backend.resolve("moe_swiglu", b, h.device))
            dx_rows = _expert_gemm(dh, None, w13t, None, layout, b)
            gg.k_grouped_bf16_gemm_nt_contiguous(dh.t(), x_rows.t(), k_offsets, dw13, accumulate=False, backend=b)
        combine_name = _backend.resolve("moe_combine", b, x.device)
        dx = _run_combine(dx_rows, layout.row_of_slot, None, combine_name)  # a permute's backward
        return dx.to(x.dtype), dw13.to(w13.dtype), dw2.to(w2.dtype), None, None, None, None, None


def _run_swiglu_backward(h, grad, token_of_row, backend):
    grad_h = _backend.empty(h.shape, h.dtype, h.device)
    _backend.pick(_swiglu_backward, _swiglu_backward_op, h, grad, token_of_row, grad_h)(h, grad, token_of_row, grad_h,
                                                                                       backend)
    return grad_h


def experts(x, layout: Layout, w13, w2, *, fp8: bool = False, quantized=None, backend: str = "auto"):
    """The routed experts over a layout: x [T, D] (bf16) -> y_rows [rows, D] bf16, row r = w2[e] SwiGLU(w13[e]
    x[token_of_row[r]]) for its expert e; padding rows unwritten (combine never reads them).
    w13 [G, 2I, D] (gate rows then up rows) and w2 [G, D, I], fp32 or bf16, D a multiple of 128, I of 64 (of
    128 for FP8).
    fp8=True runs the three GEMMs of each pass in FP8 (quantized: quantize_experts(w13, w2), else made here);
    else bf16 with fp32 sums. layout: contiguous_layout's (the contiguous grouped GEMMs), differentiable
    w.r.t. x, w13 and w2 (the weight gradients in fp32, returned in the parameters' dtype), or masked_layout's
    (the masked ones, no host sync at any routing: decode under CUDA graphs; forward only)."""
    x = _check_x(x, (torch.bfloat16,), layout)
    for name, w in (("w13", w13), ("w2", w2)):
        check_tensor(name, w, dtypes=(torch.float32, torch.bfloat16), ndim=3, device=x.device)
    G, two_i, D = w13.shape
    check_bool("fp8", fp8)
    if D != x.shape[1] or two_i % (256 if fp8 else 128) or D % 128 or tuple(w2.shape) != (G, D, two_i // 2):
        raise ValueError(f"w13 must be [G, 2I, D] and w2 [G, D, I] with D = {x.shape[1]} (x's) a multiple of 128 and "
                         f"I of {128 if fp8 else 64}, got {tuple(w13.shape)} and {tuple(w2.shape)}")
    if layout.counts.shape[0] != G:
        raise ValueError(f"layout must be made for w13's {G} experts, got one of {layout.counts.shape[0]}")
    if layout.masked and torch.is_grad_enabled() and any(t.requires_grad for t in (x, w13, w2)):
        raise ValueError("layout: a masked layout runs the forward only (decode); train over contiguous_layout, "
                         "or call under torch.no_grad()")
    _backend.resolve("moe_swiglu_fp8" if fp8 else "moe_swiglu", backend, x.device)  # (raises naming why)
    if fp8 and quantized is None:
        quantized = quantize_experts(w13, w2, backend=backend)
    layout_tensors = (layout.m_indices, layout.token_of_row, layout.row_of_slot, layout.segment_start, layout.counts)
    return _Experts.apply(x, w13, w2, layout_tensors, layout.masked, fp8, quantized, backend)


# ---------------------------------------------------------------------------------------------
# The layer.

def _shared_mlp(x2, w13, w2):
    """The shared experts' SwiGLU MLP over x2 [T, D] bf16: w13 and w2 callables (FP8Linear, fp8_linear) or
    weights [2S, D] and [D, S] (a bf16 GEMM over the fp32 or bf16 parameter, fp32 sums)."""
    def project(w, a):
        return w(a) if callable(w) else torch.nn.functional.linear(a, w.to(a.dtype))
    g, u = project(w13, x2).float().chunk(2, dim=-1)
    return project(w2, (torch.nn.functional.silu(g) * u).to(torch.bfloat16)).float()


def moe_forward(x, gate_weight, bias, w13, w2, topk: int, *, shared_w13=None, shared_w2=None, n_group: int = 1,
                topk_group: int = 1, route_scale: float = 1.0, score: str = "sigmoid", fp8: bool = False,
                quantized=None, masked: bool = False, backend: str = "auto"):
    """The MoE module's forward as a function: x [..., D] bf16 -> (y [..., D] bf16, counts [E] int32).
    gate_weight [E, D] (logits in fp32), bias [E] fp32 or None, w13 [E, 2I, D] and w2 [E, D, I] (experts()),
    the shared MLP's shared_w13 [2S, D] and shared_w2 [D, S] or None; fp8 runs the experts and the shared
    MLP through the FP8 GEMMs (the weights quantized in this call unless quantized = quantize_experts(w13,
    w2) is given); masked uses masked_layout (decode, forward only). Differentiable w.r.t. x and every
    weight (the gate's through the routing weights)."""
    check_tensor("gate_weight", gate_weight, dtypes=(torch.float32, torch.bfloat16), ndim=2)
    E, D = gate_weight.shape
    if x.shape[-1] != D:
        raise ValueError(f"x must be [..., {D}] (gate_weight is [E, D]), got {tuple(x.shape)}")
    if (shared_w13 is None) != (shared_w2 is None):
        raise ValueError("shared_w13 and shared_w2 must be given together (or neither)")
    x2 = x.reshape(-1, D).to(torch.bfloat16)
    logits = torch.nn.functional.linear(x2.float(), gate_weight.float())
    topk_idx, topk_weights, counts = route(logits, bias, topk, n_group=n_group, topk_group=topk_group,
                                           route_scale=route_scale, score=score, backend=backend)
    layout = (masked_layout if masked else contiguous_layout)(topk_idx, E, backend=backend)
    y = combine(experts(x2, layout, w13, w2, fp8=fp8, quantized=quantized, backend=backend), layout, topk_weights,
                backend=backend)
    if shared_w13 is not None:
        if fp8:
            from dskernels.linear import fp8_linear
            y = y + _shared_mlp(x2, lambda a: fp8_linear(a, shared_w13, backend=backend),
                                lambda a: fp8_linear(a, shared_w2, backend=backend))
        else:
            y = y + _shared_mlp(x2, shared_w13, shared_w2)
    return y.reshape(*x.shape[:-1], D).to(x.dtype), counts


class MoE(torch.nn.Module):
    """A DeepSeekMoE layer: the gate (routing with the balancing bias), n_routed_experts SwiGLU experts of
    intermediate size inter_dim, of which each token uses n_activated_experts, and n_shared_experts always-on
    experts (one SwiGLU MLP of n_shared_experts * inter_dim), in FP8 (fp8=True: the routed experts' and
    the shared MLP's GEMMs, forward and backward, with DeepSeek-V3's recipe; the gate stays fp32) or BF16.
    Parameters: gate.weight [E, dim], w13 [E, 2 * inter_dim, dim] (each expert's gate rows then up rows),
    w2 [E, dim, inter_dim], the shared MLP's; keep them fp32 (master weights) or bf16. The buffer `bias`
    [E] fp32 steers the choice only; update_bias() moves it after a step (outside autograd).

    forward(x [..., dim] bf16) splits into route(), dispatch(), run_experts() and combine() so that an
    expert-parallel dispatch can replace the local one; the last call's expert loads stay in
    self.last_counts (a device tensor) for update_bias. The experts' FP8 copies are made once per weight
    version and optimizer step (as FP8Linear's: any torch.optim step, the fused ones included, or any
    in-place update makes new ones; writes through `.data` are not seen: call invalidate_weight_cache()
    after them)."""

    def __init__(self, dim: int, inter_dim: int, n_routed_experts: int, n_activated_experts: int, *,
                 n_shared_experts: int = 1, n_expert_groups: int = 1, n_limited_groups: int = 1,
                 route_scale: float = 1.0, score_func: str = "sigmoid", fp8: bool = False, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__()
        for name, v in (("dim", dim), ("inter_dim", inter_dim), ("n_routed_experts", n_routed_experts),
                        ("n_activated_experts", n_activated_experts)):
            check_int(name, v, minimum=1)
        check_int("n_shared_experts", n_shared_experts, minimum=0)
        check_bool("fp8", fp8)
        if dim % 128 or inter_dim % (128 if fp8 else 64):
            raise ValueError(f"dim must be a multiple of 128 and inter_dim of {128 if fp8 else 64} (the FP8 GEMMs "
                             f"reduce over it in 128 blocks), got {dim} and {inter_dim}")
        check_choice("score_func", score_func, ("sigmoid", "softmax"))
        self.dim, self.inter_dim, self.fp8, self.backend = dim, inter_dim, fp8, backend
        self.n_routed_experts, self.topk = n_routed_experts, n_activated_experts
        self.n_group, self.topk_group = n_expert_groups, n_limited_groups
        self.route_scale, self.score_func = route_scale, score_func
        E = n_routed_experts
        factory = dict(device=device, dtype=dtype)
        self.gate = torch.nn.Linear(dim, E, bias=False, device=device, dtype=torch.float32)
        self.register_buffer("bias", torch.zeros(E, device=device, dtype=torch.float32))
        self.w13 = torch.nn.Parameter(torch.empty(E, 2 * inter_dim, dim, **factory))
        self.w2 = torch.nn.Parameter(torch.empty(E, dim, inter_dim, **factory))
        for w in (self.w13, self.w2):  # as nn.Linear's weights, per expert
            torch.nn.init.uniform_(w, -w.shape[2] ** -0.5, w.shape[2] ** -0.5)
        self.shared = None
        if n_shared_experts:
            from dskernels.linear import FP8Linear
            linear = (lambda i, o: FP8Linear(i, o, bias=False, backend=backend, **factory)) if fp8 else \
                (lambda i, o: torch.nn.Linear(i, o, bias=False, **factory))
            s = n_shared_experts * inter_dim
            self.shared = torch.nn.ModuleDict({"w13": linear(dim, 2 * s), "w2": linear(s, dim)})
        self.last_counts = None
        self._cached = None
        self.masked = False  # True: dispatch makes masked layouts (decode: forward only, under CUDA graphs)

    def route(self, x2):
        """x2 [T, dim] -> topk_idx, topk_weights (differentiable w.r.t. the gate), counts."""
        logits = self.gate(x2.float())
        return route(logits, self.bias, self.topk, n_group=self.n_group, topk_group=self.topk_group,
                     route_scale=self.route_scale, score=self.score_func, backend=self.backend)

    def dispatch(self, x2, topk_idx):
        """The local dispatch: the layout of this GPU's experts, contiguous (or masked when self.masked; an
        expert-parallel dispatch replaces it)."""
        return (masked_layout if self.masked else contiguous_layout)(topk_idx, self.n_routed_experts,
                                                                     backend=self.backend)

    def _quantized_experts(self):
        w13, w2 = self.w13, self.w2
        if torch.compiler.is_compiling() or (w13.is_cuda and torch.cuda.is_current_stream_capturing()):
            return quantize_experts(w13, w2, backend=self.backend)
        key = (_backend.optimizer_steps(), *((w.data_ptr(), w._version, w.dtype, w.shape) for w in (w13, w2)))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, quantize_experts(w13, w2, backend=self.backend))
        return self._cached[1]

    def invalidate_weight_cache(self):
        self._cached = None

    def run_experts(self, x2, layout):
        quantized = self._quantized_experts() if self.fp8 else None
        return experts(x2, layout, self.w13, self.w2, fp8=self.fp8, quantized=quantized, backend=self.backend)

    def combine(self, y_rows, layout, topk_weights):
        return combine(y_rows, layout, topk_weights, backend=self.backend)

    def forward(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., {self.dim}], got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.dim).to(torch.bfloat16)
        topk_idx, topk_weights, counts = self.route(x2)
        self.last_counts = counts.detach()
        layout = self.dispatch(x2, topk_idx)
        y = self.combine(self.run_experts(x2, layout), layout, topk_weights)
        if self.shared is not None:
            s = self.shared
            y = y + _shared_mlp(x2, s["w13"] if self.fp8 else s["w13"].weight, s["w2"] if self.fp8 else s["w2"].weight)
        return y.reshape(*x.shape[:-1], self.dim).to(x.dtype)

    @torch.no_grad()
    def update_bias(self, counts=None, gamma: float = 0.001):
        """The auxiliary-loss-free balancing step: bias -= gamma * sign(load - mean load), from counts (the
        last forward's when None; all-reduce them first under data parallelism so every rank moves alike)."""
        counts = self.last_counts if counts is None else counts
        if counts is None:
            raise ValueError("update_bias needs counts: run a forward first or pass them")
        update_bias(self.bias, counts, gamma)
