"""FP8 quantization throughput: GB/s against the device-copy ceiling, and the speedup over the
plain-PyTorch reference (eager) measured in the same run."""
import pytest
import torch

import dskernels
from dskernels.reference.quant import cdiv
from dskernels.shapes import QUANT_ACTIVATIONS, QUANT_WEIGHTS

BACKENDS = ["cuda", "triton"]


def bytes_moved(M, K, scales, in_bytes=2):
    """Read the input once, write one byte per element and the fp32 scales."""
    return M * K * (in_bytes + 1) + scales * 4


OPS = {
    "per_token_group_quant": (dskernels.per_token_group_quant, QUANT_ACTIVATIONS,
                              lambda M, K: cdiv(K, 128) * M),
    "per_token_group_quant_transposed": (dskernels.per_token_group_quant_transposed,
                                         QUANT_ACTIVATIONS, lambda M, K: cdiv(M, 128) * K),
    "per_block_quant": (dskernels.per_block_quant, QUANT_WEIGHTS,
                        lambda M, K: cdiv(M, 128) * cdiv(K, 128)),
    # both layouts: one read, two e4m3 writes (bytes_moved counts one; the second is added below)
    "per_token_group_quant_both": (dskernels.per_token_group_quant_both, QUANT_ACTIVATIONS,
                                   lambda M, K: cdiv(K, 128) * M + cdiv(M, 128) * K),
}
CASES = [(op, shape) for op, (_, shapes, _) in OPS.items() for shape in shapes]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{op}-{M}x{K}" for op, (M, K) in CASES])
def test_quant(report, op, shape, backend):
    fn, _, n_scales = OPS[op]
    M, K = shape
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    second_write = M * K if op == "per_token_group_quant_both" else 0
    report(op=op, backend=backend, shape={"M": M, "K": K, "dtype": "bf16"},
           fn=lambda: fn(x, backend=backend), bytes_moved=bytes_moved(M, K, n_scales(M, K)) + second_write,
           bound="copy_GBps", peer="reference (eager PyTorch)",
           peer_fn=lambda: fn(x, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", QUANT_ACTIVATIONS, ids=str)
def test_dequant(report, shape, backend):
    M, K = shape
    q, s = dskernels.per_token_group_quant(torch.randn(M, K, device="cuda"), backend="reference")
    report(op="dequant", backend=backend, shape={"M": M, "K": K, "dtype": "bf16"},
           fn=lambda: dskernels.dequant(q, s, backend=backend),
           bytes_moved=M * K * 3 + s.numel() * 4, bound="copy_GBps",
           peer="reference (eager PyTorch)", peer_fn=lambda: dskernels.dequant(q, s, backend="reference"))
