"""A DeepSeekMoE layer's routing and data movement: the public API.

    topk_idx, topk_weights, counts = route(logits, bias, topk, n_group=8, topk_group=4, route_scale=2.5)
    layout = contiguous_layout(topk_idx, num_experts)      # expert-sorted rows, segments aligned to 128
    x_rows = permute(x, layout)                            # [rows, D] bf16, differentiable
    q, scale = permute_fp8(x, layout)                      # the same rows as e4m3 with 1 x 128 scales
    ... the experts: dskernels.grouped_gemm over layout.m_indices ...
    y = combine(y_rows, layout, topk_weights)              # [T, D], differentiable w.r.t. both
    update_bias(bias, counts, gamma=0.001)                 # auxiliary-loss-free balancing, in place

The numerics are specified in dskernels.reference.moe (ties, slot order, fp32 sums, the backwards).
Memory: no token is ever dropped and no host sync sizes anything, so a layout holds
layout_rows(T, k, E) = T * k + E * 127 rows (the worst case of every expert's segment padded to 128):
at T = 4096, k = 8, E = 256 that is 65,280 rows, 1.99x T * k (with 32 local experts, the
expert-parallel case, 36,832: 1.12x); permute's output is that many rows of D elements. Padding rows of a permute are zero (the weight gradient sums over them).

Backends: the reference (PyTorch ops, on any device, without a host sync) and Triton on a GPU for every
step: the routing's choice (its weights are PyTorch ops on the chosen affinities, the reference's bits),
the layout (three launches), permute, FP8 permute, combine and the backwards. Each kernel launch is a
torch.library custom op under tracing (torch.compile), called directly in eager mode. A layout is
trusted as contiguous_layout made it: the kernels never read out of bounds, but a corrupted one gives
NaN rows, not an exception (checking it would cost a sync).
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

__all__ = ["Layout", "route", "contiguous_layout", "layout_rows", "permute", "permute_fp8", "combine",
           "update_bias"]


# ---------------------------------------------------------------------------------------------
# Routing and layout.

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
    from dskernels.triton import moe as tm  # imported lazily: triton is optional
    with _backend.on_device(s):
        tm.route_choice(s, bias, topk, n_group, topk_group, idx, counts)


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
    topk_idx = _backend.as_tensor("topk_idx", topk_idx)
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int32, torch.int64), ndim=2, nonempty=False, contiguous=False)
    num_experts = check_int("num_experts", num_experts, minimum=1)
    name = _backend.resolve("moe_layout", backend, topk_idx.device)
    if name == "reference":
        return _ref.contiguous_layout(topk_idx, num_experts)
    idx = topk_idx.to(torch.int32).contiguous()
    T, k = idx.shape
    device = idx.device
    rows = layout_rows(T, k, num_experts)
    m_indices, token_of_row = (_backend.empty((rows,), torch.int32, device) for _ in range(2))
    row_of_slot = _backend.empty((T, k), torch.int32, device)
    segment_start, counts = (_backend.empty((num_experts,), torch.int32, device) for _ in range(2))
    from dskernels.triton.moe import LAYOUT_BLOCK
    workspace = _backend.empty((2, max(1, cdiv(T * k, LAYOUT_BLOCK)), num_experts), torch.int32, device)
    outs = (m_indices, token_of_row, row_of_slot, segment_start, counts, workspace)
    _backend.pick(_layout, _layout_op, idx, *outs)(idx, num_experts, *outs)
    return Layout(m_indices, token_of_row, row_of_slot, segment_start, counts)


def _layout(topk_idx, num_experts, m_indices, token_of_row, row_of_slot, segment_start, counts, workspace):
    from dskernels.triton import moe as tm
    with _backend.on_device(topk_idx):
        tm.contiguous_layout(topk_idx, num_experts, _ref.ALIGNMENT, m_indices, token_of_row, row_of_slot,
                             segment_start, counts, workspace)


@torch.library.custom_op("dskernels::moe_layout", mutates_args=("m_indices", "token_of_row", "row_of_slot",
                                                                "segment_start", "counts", "workspace"))
def _layout_op(topk_idx: torch.Tensor, num_experts: int, m_indices: torch.Tensor, token_of_row: torch.Tensor,
               row_of_slot: torch.Tensor, segment_start: torch.Tensor, counts: torch.Tensor,
               workspace: torch.Tensor) -> None:
    _layout(topk_idx, num_experts, m_indices, token_of_row, row_of_slot, segment_start, counts, workspace)


@_layout_op.register_fake
def _(topk_idx, num_experts, m_indices, token_of_row, row_of_slot, segment_start, counts, workspace):
    return None


# ---------------------------------------------------------------------------------------------
# Permute and combine: the implementations (each fills preallocated outputs) and their custom ops.

def _partial_layout(token_of_row, row_of_slot):
    return Layout(None, token_of_row, row_of_slot, None, None)


def _permute(x, token_of_row, out, scale, pow2_scale, backend):
    if not out.numel():
        return
    if backend == "reference":
        rows = _ref.permute(x, _partial_layout(token_of_row, None))
        if scale is None:
            out.copy_(rows)
        else:
            q, s = _ref_quant.per_token_group_quant(rows, pow2_scale)
            out.copy_(q)
            scale.copy_(s)
        return
    from dskernels.triton import moe as tm  # imported lazily: triton is optional
    with _backend.on_device(x):
        tm.permute(x, token_of_row, out, scale, pow2_scale)


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
    from dskernels.triton import moe as tm
    with _backend.on_device(y):
        tm.combine(y, row_of_slot, weights, out)


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
    from dskernels.triton import moe as tm
    with _backend.on_device(y):
        tm.combine_backward(grad, y, token_of_row, row_of_slot, weights, grad_y, grad_weights)


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
        raise TypeError(f"layout must be a dskernels.moe.Layout (from contiguous_layout), got {type(layout).__name__}")
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
