"""The three GEMMs of a Linear layer y = x W^T in FP8 (DeepSeek-V3's recipe), as an autograd
function.

    forward         y  = x  W^T   a = x  [M, K] per 1x128 tiles,   b = W   [N, K] per 128x128 blocks
    input gradient  dx = dy W     a = dy [M, N] per 1x128 tiles,   b = W^T [K, N] per 128x128 blocks
    weight gradient dW = dy^T x   a = dy^T [N, M] per 1x128 tiles, b = x^T [K, M] per 1x128 tiles
                                  (the reduction runs over tokens: "1D1D", accumulated in fp32)

W^T's quantization is W's transposed (the same 128x128 blocks, the same scales), so the weight is
quantized once. The token count M is padded with zero rows to a multiple of 128 for the weight
gradient, whose reduction dim it is.
"""
import torch

from dskernels.gemm import fp8_gemm
from dskernels.quant import per_block_quant, per_token_group_quant, per_token_group_quant_transposed


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-t.shape[0]) % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t


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
        dyq, dys = per_token_group_quant(dy, scale_layout="col", backend=backend)
        dx = fp8_gemm(dyq, dys, wq.t().contiguous(), ws.t().contiguous(), backend=backend)
        dy_p, x_p = _pad_rows(dy, 128), _pad_rows(x, 128)
        dyq_t, dys_t = per_token_group_quant_transposed(dy_p, scale_layout="col", backend=backend)
        xq_t, xs_t = per_token_group_quant_transposed(x_p, scale_layout="col", backend=backend)
        dw = torch.zeros(dy.shape[1], x.shape[1], dtype=torch.float32, device=dy.device)
        fp8_gemm(dyq_t, dys_t, xq_t, xs_t, out=dw, accumulate=True, backend=backend)
        return dx.to(x.dtype), dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y = x @ weight.T through FP8 GEMMs, differentiable. x [M, K] bf16, weight [N, K] (bf16 or
    fp32 master weights; the weight gradient is accumulated in fp32, returned in the weight's
    dtype). K and N multiples of 128."""
    return FP8LinearFunction.apply(x, weight, backend)
