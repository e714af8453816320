"""The three GEMMs of a Linear layer y = x W^T in FP8 (DeepSeek-V3's recipe), as an autograd
function.

    forward         y  = x  W^T   a = x  [M, K] per 1x128 tiles,   b = W   [N, K] per 128x128 blocks
    input gradient  dx = dy W     a = dy [M, N] per 1x128 tiles,   b = W^T [K, N] per 128x128 blocks
    weight gradient dW = dy^T x   a = dy^T [N, M] per 1x128 tiles, b = x^T [K, M] per 1x128 tiles
                                  (the reduction runs over tokens: "1D1D", accumulated in fp32)

W^T's quantization is W's transposed (the same 128x128 blocks, the same scales), so the weight is
quantized once. Each GEMM's reduction dim must be a multiple of 128; where it is not, it is padded with
zeros, which is exact: zeros add nothing to a sum and leave every tile's amax (so its scale) as it was.
That is K's job in the forward (K must already be a multiple of 128), N's in the input gradient (N =
2112 or 576 work) and the token count M's in the weight gradient.
"""
import torch

from dskernels.checks import check_tensor
from dskernels.gemm import fp8_gemm
from dskernels.quant import per_block_quant, per_token_group_quant, per_token_group_quant_transposed

FP8 = torch.float8_e4m3fn


def _pad_dim(t: torch.Tensor, dim: int, multiple: int = 128) -> torch.Tensor:
    """t with zeros appended along `dim` (0 or 1 of a 2-D tensor) up to a multiple of `multiple`."""
    pad = (-t.shape[dim]) % multiple
    if not pad:
        return t
    raw = t.view(torch.uint8) if t.dtype == FP8 else t  # e4m3 zero is the zero byte
    padded = torch.nn.functional.pad(raw, (0, pad) if dim == 1 else (0, 0, 0, pad))
    return padded.view(FP8) if t.dtype == FP8 else padded


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, backend):
        xq, xs = per_token_group_quant(x, scale_layout="col", backend=backend)
        wq, ws = per_block_quant(weight, backend=backend)
        ctx.save_for_backward(x, wq, ws)
        ctx.backend = backend
        return fp8_gemm(xq, xs, wq, ws, backend=backend)

    @staticmethod
    def backward(ctx, dy):
        x, wq, ws = ctx.saved_tensors
        backend = ctx.backend
        dy = dy.contiguous()
        dyq, dys = per_token_group_quant(_pad_dim(dy, 1), scale_layout="col", backend=backend)
        w_t = _pad_dim(wq.t().contiguous(), 1)                                     # [K, N padded]
        dx = fp8_gemm(dyq, dys, w_t, ws.t().contiguous(), backend=backend)
        dyq_t, dys_t = per_token_group_quant_transposed(_pad_dim(dy, 0), scale_layout="col", backend=backend)
        xq_t, xs_t = per_token_group_quant_transposed(_pad_dim(x, 0), scale_layout="col", backend=backend)
        dw = torch.zeros(dy.shape[1], x.shape[1], dtype=torch.float32, device=dy.device)
        fp8_gemm(dyq_t, dys_t, xq_t, xs_t, out=dw, accumulate=True, backend=backend)
        return dx.to(x.dtype), dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight [N, K].T through FP8 GEMMs, differentiable.

    x: bf16/fp16/fp32, contiguous, K (in_features) a multiple of 128. weight: bf16/fp16/fp32 (e.g. fp32
    master weights), any N (out_features). y is bf16; the gradients come back in x's and weight's dtypes
    (the weight gradient is accumulated in fp32)."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    check_tensor("x", x, dtypes=dtypes, ndim=2)
    check_tensor("weight", weight, dtypes=dtypes, ndim=2, device=x.device)
    if x.shape[1] % 128:
        raise ValueError(f"x's last dimension (in_features, the forward GEMM's reduction) must be a multiple of "
                         f"128, got {x.shape[1]}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [out_features, {x.shape[1]}] (x has {x.shape[1]} in_features), got "
                         f"{tuple(weight.shape)}")
    return FP8LinearFunction.apply(x, weight, backend)
