"""FP8 Linear layers (DeepSeek-V3's recipe): y = x W^T (+ bias) through three block-wise FP8 GEMMs.

    layer = FP8Linear(in_features, out_features, bias=False)   # or FP8Linear.from_linear(linear)
    y = layer(x)                                               # x [..., in_features]
    y = fp8_linear(x, weight, bias)                            # the functional form (no weight cache)

    forward         y  = x  W^T   a = x  [M, K] per 1x128 tiles,   b = W   [N, K] per 128x128 blocks
    input gradient  dx = dy W     a = dy [M, N] per 1x128 tiles,   b = W^T [K, N] per 128x128 blocks
    weight gradient dW = dy^T x   a = dy^T [N, M] per 1x128 tiles, b = x^T [K, M] per 1x128 tiles
                                  (the reduction runs over tokens: "1D1D", accumulated in fp32)

Built for training speed:
- x is quantized both ways in one pass (per_token_group_quant_both): per row for the forward, per
  column (x^T) for the weight gradient, and only x^T's FP8 copy is kept for the backward (DeepSeek-V3
  caches activations in FP8). A forward that needs no weight gradient quantizes per row only; a
  forward under no_grad does only the forward's work. The backward quantizes dy both ways in one pass.
- The weight's quantization, W and W^T (the same 128x128 blocks, the same scales, from one read of W
  with the CUDA backend in eager mode), is made once and reused until the weight changes
  (FP8Linear.quantized_weight has the rule).
- Each GEMM writes its output in the dtype wanted (no cast pass): y and dx in x's dtype, dW in the
  weight's, or accumulated straight into an fp32 `weight.main_grad` (fuse_wgrad_accumulation=True).
- Reductions not a multiple of 128 are zero-padded, which is exact (zeros add nothing to a sum and leave
  every tile's amax, so its scale, as it was): N in the input gradient (N = 2112 or 576 work), the token
  count in the weight gradient. K (in_features) must be a multiple of 128.
"""
import weakref

import torch
import torch.nn.functional as F

from dskernels import backend as _backend
from dskernels.checks import check_bool, check_choice, check_tensor
from dskernels.gemm import gemm_into_unchecked, gemm_unchecked
from dskernels.quant import (blocks_both_unchecked, blocks_unchecked, both_unchecked, groups_transposed_unchecked,
                             groups_unchecked)

__all__ = ["FP8Linear", "fp8_linear", "quantize_weight"]

FP8 = torch.float8_e4m3fn
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _pad_dim(t: torch.Tensor, dim: int, multiple: int = 128) -> torch.Tensor:
    """t with zeros appended along `dim` (0 or 1 of a 2-D tensor) up to a multiple of `multiple`."""
    pad = (-t.shape[dim]) % multiple
    if not pad:
        return t
    raw = t.view(torch.uint8) if t.dtype == FP8 else t  # e4m3 zero is the zero byte
    padded = F.pad(raw, (0, pad) if dim == 1 else (0, 0, 0, pad))
    return padded.view(FP8) if t.dtype == FP8 else padded


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMM output dtype closest to `dtype` (fp8_gemm writes bf16 or fp32)."""
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def quantize_weight(weight: torch.Tensor, *, transposed: bool = True, backend: str = "auto"):
    """[wq, ws, wq_t, ws_t]: weight [N, K] per 128x128 block for the forward, and (transposed=True) its
    transpose [K, N rounded up to 128] (zero columns) with the transposed scales for the input gradient;
    without, wq_t and ws_t are None."""
    w = weight.detach().contiguous()
    both = blocks_both_unchecked(w, False, True, backend) if transposed else None
    if both is not None:  # W and W^T from one read of W
        return both
    wq, ws = blocks_unchecked(w, False, backend)
    return [wq, ws, *(_transpose(wq, ws) if transposed else (None, None))]


def _transpose(wq, ws):
    """W^T's quantization from W's: the same 128x128 blocks and scales, transposed (and N padded)."""
    return _pad_dim(wq.t().contiguous(), 1), ws.t().contiguous()


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, wq, ws, wq_t, ws_t, backend, fuse_wgrad, needs):
        # needs: which of x, weight, bias want a gradient, read by the caller off the tensors themselves
        need_dx, need_dw, _ = ctx.needs = needs
        if need_dw:
            xq, xs, xq_t, xs_t = both_unchecked(x, False, "col", True, backend)
        else:
            (xq, xs), xq_t, xs_t = groups_unchecked(x, False, "col", backend), None, None
        y = _forward_gemm(xq, xs, wq, ws, bias, x.dtype, backend)
        ctx.save_for_backward(xq_t, xs_t, wq_t if need_dx else None, ws_t if need_dx else None,
                              weight if fuse_wgrad and need_dw else None)
        ctx.x_dtype, ctx.w_dtype, ctx.backend, ctx.fuse_wgrad = x.dtype, weight.dtype, backend, fuse_wgrad
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        xq_t, xs_t, wq_t, ws_t, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs
        backend = ctx.backend
        dy = dy.contiguous()
        dx = dw = db = None
        if need_dx and need_dw:
            dyq, dys, dyq_t, dys_t = both_unchecked(dy, False, "col", True, backend)
        elif need_dx:
            dyq, dys = groups_unchecked(_pad_dim(dy, 1), False, "col", backend)
        elif need_dw:
            dyq_t, dys_t = groups_transposed_unchecked(_pad_dim(dy, 0), False, "col", backend)
        if need_dx:
            dx = _cast(gemm_unchecked(dyq, dys, wq_t, ws_t, _gemm_dtype(ctx.x_dtype), backend), ctx.x_dtype)
        if need_dw:
            if ctx.fuse_wgrad:  # into the fp32 main grad, by the GEMM itself; autograd gets no weight grad
                gemm_into_unchecked(dyq_t, dys_t, xq_t, xs_t, _main_grad(weight), True, backend)
            else:
                dw = _cast(gemm_unchecked(dyq_t, dys_t, xq_t, xs_t, _gemm_dtype(ctx.w_dtype), backend), ctx.w_dtype)
        if need_db:
            db = _cast(dy.sum(0, dtype=torch.float32), ctx.b_dtype)
        return dx, dw, db, None, None, None, None, None, None, None


def _cast(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _forward_gemm(xq, xs, wq, ws, bias, dtype, backend):
    """y = x W^T (+ bias) in `dtype`. Under torch.compile no in-place op and no alias of an intermediate
    is returned (see _apply)."""
    y = gemm_unchecked(xq, xs, wq, ws, _gemm_dtype(dtype), backend)
    if bias is not None:
        y = y + bias if torch.compiler.is_compiling() else y.add_(bias)
    return _cast(y, dtype)


def _apply(*args):
    return _FP8LinearFunction.apply(*args)


# torch 2.11's torch.compile returns zero gradients for an autograd.Function whose forward mutates or
# returns an alias of an intermediate (pytorch/pytorch#180642, fixed in 2.12): seen on an H200 with
# torch 2.11 for this function (dx, dW and db all zero). The forward above avoids both patterns, but until
# that is shown to be enough on 2.11, torch.compile runs the function eagerly there (a graph break:
# fullgraph=True then raises instead of returning zeros).
if torch.torch_version.TorchVersion(torch.__version__) < (2, 12):
    _apply = torch.compiler.disable(_apply)


def _main_grad(weight: torch.Tensor) -> torch.Tensor:
    """weight.main_grad, the fp32 gradient the weight-gradient GEMM adds into (zeros at first)."""
    grad = getattr(weight, "main_grad", None)
    if grad is None:
        grad = weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    if (grad.dtype != torch.float32 or grad.shape != weight.shape or not grad.is_contiguous()
            or grad.device != weight.device):
        raise ValueError(f"weight.main_grad must be a contiguous float32 tensor of the weight's shape "
                         f"{tuple(weight.shape)} on {weight.device}, got {grad.dtype} {tuple(grad.shape)} on "
                         f"{grad.device}")
    return grad


def _check(x, weight, bias, backend):
    check_tensor("x", x, dtypes=FLOATS, contiguous=False, nonempty=False)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (in_features)")
    check_tensor("weight", weight, dtypes=FLOATS, ndim=2, device=x.device)
    K = x.shape[-1]
    if K % 128:
        raise ValueError(f"x's last dimension (in_features, the forward GEMM's reduction) must be a multiple of "
                         f"128, got {K}")
    if weight.shape[1] != K:
        raise ValueError(f"weight must be [out_features, {K}] (x has {K} in_features), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOATS, ndim=1, device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [{weight.shape[0]}] (out_features), got {tuple(bias.shape)}")
    for op in ("per_token_group_quant_both", "fp8_gemm", "per_block_quant"):  # raises naming the rule
        _backend.resolve(op, backend, x.device)


def _linear(x, weight, bias, quantized, backend, fuse_wgrad):
    """x [..., K] -> [..., N] (x, weight and bias checked); quantized(transposed) gives the weight's FP8
    copies (quantize_weight's list)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:  # no tokens: nothing to quantize (the kernels take at least one row)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                         (bias is not None and bias.requires_grad))
    wq, ws, wq_t, ws_t = quantized(grads and x.requires_grad)
    if not grads:  # the forward's work alone
        xq, xs = groups_unchecked(x2.contiguous(), False, "col", backend)
        return _forward_gemm(xq, xs, wq, ws, bias, x.dtype, backend).reshape(*lead, weight.shape[0])
    needs = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    y = _apply(x2.contiguous(), weight, bias, wq, ws, wq_t, ws_t, backend, fuse_wgrad, needs)
    return y.reshape(*lead, weight.shape[0])


def fp8_linear(x, weight, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """y [..., N] = x [..., K] @ weight [N, K].T (+ bias [N]) through FP8 GEMMs, differentiable.

    x: fp32/bf16/fp16, K (in_features) a multiple of 128; weight and bias: fp32/bf16/fp16 (e.g. fp32
    master weights), any N (out_features). y and the input gradient come in x's dtype, the weight and
    bias gradients in fp32 or the weight's dtype (the weight gradient is accumulated in fp32). The weight
    is quantized in every call: FP8Linear keeps it quantized between optimizer steps."""
    _check(x, weight, bias, backend)
    return _linear(x, weight, bias, lambda transposed: quantize_weight(weight, transposed=transposed, backend=backend),
                   backend, False)


class FP8Linear(torch.nn.Module):
    """A drop-in for torch.nn.Linear whose three GEMMs run in FP8 (the module docstring has the recipe).

    FP8Linear(in_features, out_features, bias=True, device=None, dtype=None, *, backend="auto",
    fuse_wgrad_accumulation=False). in_features must be a multiple of 128. Parameters are initialized as
    nn.Linear's; keep them in fp32 (master weights) or bf16. fuse_wgrad_accumulation=True adds each weight
    gradient into `weight.main_grad` (fp32, created as zeros on first use, zeroed by you between optimizer
    steps) inside the GEMM and leaves weight.grad unset: gradient accumulation over micro-batches without
    a pass of its own (for optimizers that read main_grad; with torch DDP keep the default, whose gradient
    reaches weight.grad through autograd)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto", fuse_wgrad_accumulation: bool = False):
        super().__init__()
        if in_features % 128:
            raise ValueError(f"in_features must be a multiple of 128 (the forward GEMM's reduction), got {in_features}")
        check_bool("bias", bias)
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        torch.nn.Linear.reset_parameters(self)
        self._setup(backend, fuse_wgrad_accumulation)

    def _setup(self, backend, fuse_wgrad_accumulation):
        check_choice("backend", backend, ("auto", *_backend.BACKENDS))
        check_bool("fuse_wgrad_accumulation", fuse_wgrad_accumulation)
        self.backend, self.fuse_wgrad_accumulation = backend, fuse_wgrad_accumulation
        self._cached = None  # (key, quantized weight)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, backend: str = "auto",
                    fuse_wgrad_accumulation: bool = False) -> "FP8Linear":
        """An FP8Linear over `linear`'s own parameters (shared, not copied: an optimizer that holds them
        goes on working)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if linear.in_features % 128:
            raise ValueError(f"linear.in_features must be a multiple of 128, got {linear.in_features}")
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._setup(backend, fuse_wgrad_accumulation)
        return layer

    def quantized_weight(self, transposed: bool = True):
        """quantize_weight(self.weight), cached (W^T's copy made only once a backward needs it). In eager
        mode the cache is used only while the weight is the same tensor object with the same storage, dtype,
        shape and device, the same value of its version counter (which in-place updates advance: copy_(),
        add_() under no_grad), no torch.optim optimizer has stepped since (any optimizer's step(): a fused one,
        torch's fused AdamW, updates parameters without advancing their version counters) and the same
        inference mode. Updates that do neither are not seen: writes through `weight.data` and in-place
        updates replayed from a CUDA graph (a captured optimizer step); call invalidate_weight_cache() after
        them. A weight computed per
        call (a parametrization, torch.func.functional_call) is never cached. Under CUDA-graph capture and
        torch.compile the weight is quantized in every call, inside the graph, so each replay reads the
        current weight."""
        return self._quantized(self.weight, transposed)

    def _quantized(self, w, transposed):
        """quantized_weight for the weight `w` that a forward read (a parametrized weight is computed on
        every access of self.weight)."""
        if (torch.compiler.is_compiling() or (w.is_cuda and torch.cuda.is_current_stream_capturing())
                or w.grad_fn is not None or torch.nn.utils.parametrize.is_parametrized(self, "weight")):
            return quantize_weight(w, transposed=transposed, backend=self.backend)
        key = (w.data_ptr(), w._version, _backend.optimizer_steps(), w.dtype, w.shape, w.device,
               torch.is_inference_mode_enabled())
        cached = self._cached
        if cached is None or cached[0]() is not w or cached[1] != key:
            made = quantize_weight(w, transposed=transposed, backend=self.backend)
            cached = self._cached = (weakref.ref(w), key, made)
        quantized = cached[2]
        if transposed and quantized[2] is None:
            quantized[2:] = _transpose(quantized[0], quantized[1])
        return quantized

    def invalidate_weight_cache(self):
        self._cached = None

    def forward(self, x):
        weight, bias = self.weight, self.bias  # (once: a parametrized weight is computed on each access)
        _check(x, weight, bias, self.backend)
        return _linear(x, weight, bias, lambda transposed: self._quantized(weight, transposed), self.backend,
                       self.fuse_wgrad_accumulation)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")
