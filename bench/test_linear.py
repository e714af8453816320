"""FP8 training linear: forward + backward of FP8Linear against bf16 nn.Linear (bf16 parameters, no
bias) on the same module's weights, eager as a training step calls it (headline), with torchao's
block-wise FP8 training linear (torchao.prototype.blockwise_fp8_training) as a second peer where it
imports. FLOPs: the three GEMMs, 3 * 2 * T * D * N.

What eager_us covers: FP8Linear's weight quantization is cached between optimizer steps, so the eager
times leave it out; it is timed on its own (weight_quant_us, once per step) beside them. Under CUDA-graph
capture FP8Linear quantizes the weight in every call (so a replay sees the current weight): graph_us
includes it. torchao quantizes its weight twice per call (forward and backward) in every mode."""
import os

import pytest
import torch

from dskernels import FP8Linear
from dskernels.linear import quantize_weight

T_VALUES = [2048, 4096, 16384]
DN = [(1024, 1024), (2048, 2048), (2048, 5632), (7168, 7168), (7168, 2048), (2048, 7168)]
SHAPES = [(T, D, N) for T in T_VALUES for D, N in DN]


def torchao_linear(linear):
    """torchao's block-wise FP8 training linear over `linear`'s weight, or None with the reason.
    DSKERNELS_BENCH_TORCHAO=0 leaves it out: its quantization kernels autotune 45 configs per new shape,
    minutes on a machine with a cold Triton cache."""
    if os.environ.get("DSKERNELS_BENCH_TORCHAO") == "0":
        return None, "left out of this run (DSKERNELS_BENCH_TORCHAO=0)"
    try:
        from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear
        return Float8BlockwiseLinear.from_float(linear), None
    except Exception as e:  # not installed, or refuses this GPU / torch
        return None, f"{type(e).__name__}: {e}"


def train_step(layer, x, dy):
    def step():
        x.grad = layer.weight.grad = None
        layer(x).backward(dy)
    return step


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-N{}".format(*s))
def test_fp8_linear_train(report, timer, shape):
    T, D, N = shape
    torch.manual_seed(0)
    linear = torch.nn.Linear(D, N, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    more, extra = {}, {"weight_quant_us": round(timer(lambda: quantize_weight(linear.weight)), 3),
                       "graph_includes_weight_quant": True}
    peer2, why = torchao_linear(linear)
    if peer2 is not None:
        more["torchao"] = train_step(peer2, x, dy)
    else:
        extra["torchao_unavailable"] = why
    report(op="fp8_linear_train", backend="auto", shape={"T": T, "D": D, "N": N},
           fn=train_step(layer, x, dy), flops=6 * T * D * N, bytes_moved=0, bound="fp8_TFLOPS",
           peer="bf16 nn.Linear (cuBLAS)", peer_fn=train_step(linear, x, dy), more_peers=more,
           headline="eager", extra=extra)
