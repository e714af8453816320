"""The MoE layer (dskernels.moe), its steps and the routed layer whole, on the issue's two layers:
DeepSeek-V3 as one GPU of 8-way expert parallelism sees it (4096 tokens, 256 experts in 8 groups, top-8 of
4 groups; the permute, combine and experts over 32 local experts' 32768 rows, hidden 7168, intermediate
2048) and a small model (8192 tokens, 64 experts, top-6, hidden 2048, intermediate 1408). Peers in the
same run: the specification's PyTorch ops for the steps, a plain-PyTorch bf16 layer on torch._grouped_mm
for the whole. Bytes count each element read and written once (the padding rows' writes included);
routing + layout is reported as kernel time beside its host time."""
import pytest
import torch

from dskernels import moe
from dskernels.reference import moe as ref

BACKENDS = ["triton"]
LAYERS = {  # T, E, topk, n_group, topk_group, D, local experts (the permute's share), routing
    "v3_ep8": (4096, 256, 8, 8, 4, 7168, 32),
    "small": (8192, 64, 6, 1, 1, 2048, 64),
}


def routed(name, skewed=False):
    T, E, topk, n_group, topk_group, D, local = LAYERS[name]
    g = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=g).cuda()
    if skewed:  # half the tokens prefer expert 0's group
        logits[: T // 2, : E // max(n_group, 8)] += 3
    bias = torch.zeros(E, device="cuda")
    return logits, bias


def local_routing(T, topk, local, seed):
    """A rank's rows under expert parallelism: T tokens, each with topk distinct experts among the `local`
    ones, uniformly (T * topk rows, about T * topk / local per expert)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, local, generator=g).argsort(dim=1)[:, :topk]
    return idx.to(torch.int32).cuda()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_route_and_layout(report, layer, skewed, backend):
    T, E, topk, n_group, topk_group, D, local = LAYERS[layer]
    logits, bias = routed(layer, skewed)

    def ours():
        idx, w, counts = moe.route(logits, bias, topk, n_group=n_group, topk_group=topk_group, route_scale=2.5,
                                   backend=backend)
        return moe.contiguous_layout(idx, E, backend=backend), w

    def peer():
        idx, w, counts = ref.route(logits, bias, topk, n_group, topk_group, 2.5)
        return ref.contiguous_layout(idx, E), w
    rows = moe.layout_rows(T, topk, E)
    report(op="moe_route_layout", backend=backend, shape={"layer": layer, "T": T, "E": E, "topk": topk,
                                                          "skewed": skewed},
           fn=ours, bytes_moved=T * E * 4 + T * topk * 12 + rows * 8, bound="copy_GBps",
           peer="PyTorch ops (reference)", peer_fn=peer, headline="eager")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_permute(report, layer, fp8, backend):
    T, E, topk, n_group, topk_group, D, local = LAYERS[layer]
    layout = moe.contiguous_layout(local_routing(T, topk, local, seed=1), local)
    x = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")
    rows = layout.token_of_row.shape[0]
    if fp8:
        fn = lambda: moe.permute_fp8(x, layout, scale_layout="col", backend=backend)  # noqa: E731
        written = rows * D + rows * (D // 128) * 4
    else:
        fn = lambda: moe.permute(x, layout, backend=backend)  # noqa: E731
        written = rows * D * 2
    report(op="moe_permute_fp8" if fp8 else "moe_permute", backend=backend,
           shape={"layer": layer, "T": T, "topk": topk, "experts": local, "D": D},
           fn=fn, bytes_moved=T * topk * D * 2 + written, bound="copy_GBps", peer="PyTorch ops (reference)",
           peer_fn=lambda: moe.permute(x, layout, backend="reference"), headline="eager")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_combine(report, layer, direction, backend):
    T, E, topk, n_group, topk_group, D, local = LAYERS[layer]
    layout = moe.contiguous_layout(local_routing(T, topk, local, seed=2), local)
    rows = layout.token_of_row.shape[0]
    train = direction == "forward_backward"
    y = torch.randn(rows, D, dtype=torch.bfloat16, device="cuda", requires_grad=train)
    w = torch.rand(T, topk, device="cuda", requires_grad=train)
    grad = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")

    def run(b):
        if not train:
            return lambda: moe.combine(y, layout, w, backend=b)
        return lambda: torch.autograd.grad(moe.combine(y, layout, w, backend=b), (y, w), grad)
    # forward: the k rows of each token read, the token written; the backward adds the output gradient
    # read once per slot, the rows read again (the weight gradient) and their gradients written
    moved = T * topk * D * 2 + T * D * 2 + (2 * T * topk * D * 2 + rows * D * 2 if train else 0)
    report(op=f"moe_combine_{direction}", backend=backend,
           shape={"layer": layer, "T": T, "topk": topk, "experts": local, "D": D},
           fn=run(backend), bytes_moved=moved, bound="copy_GBps", peer="PyTorch ops (reference)",
           peer_fn=run("reference"), headline="eager")


def torch_moe_layer(x, gate_w, bias, w13, w2, topk, n_group, topk_group):
    """The routed layer in plain PyTorch with bf16 torch._grouped_mm (what torchtitan does): route, sort the
    slots by expert, gather, two grouped GEMMs around SwiGLU, weighted scatter-add back."""
    E = w13.shape[0]
    idx, w, _ = ref.route(x.float() @ gate_w.t(), bias, topk, n_group, topk_group, 2.5)
    flat = idx.flatten().long()
    order = torch.argsort(flat, stable=True)
    ones = torch.ones_like(flat, dtype=torch.int32)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(0, flat, ones)
    offs = counts.cumsum(0).to(torch.int32)
    tok = order // topk
    h = torch._grouped_mm(x[tok], w13.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16)
    g, u = h.float().chunk(2, dim=-1)
    act = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
    y_rows = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16)
    return torch.zeros_like(x, dtype=torch.float32).index_add_(0, tok, y_rows.float() * w.flatten()[order, None])


MOE_LAYERS = {  # T, dim, inter, experts, topk, groups, kept groups: the two layers, routed part
    "v3_ep8_local": (4096, 7168, 2048, 32, 8, 1, 1),
    "small": (8192, 2048, 1408, 64, 6, 1, 1),
}


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("layer", list(MOE_LAYERS))
def test_moe_layer(report, layer, train, fp8):
    """The routed experts of one layer (routing, layout, permute, experts, combine; no shared expert) against
    the plain-PyTorch bf16 layer above on the same weights."""
    T, dim, inter, E, topk, n_group, topk_group = MOE_LAYERS[layer]
    torch.manual_seed(T)
    m = moe.MoE(dim, inter, E, topk, n_shared_experts=0, n_expert_groups=n_group, n_limited_groups=topk_group,
                route_scale=2.5, fp8=fp8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, dim, dtype=torch.bfloat16, device="cuda", requires_grad=train)
    dy = torch.randn(T, dim, dtype=torch.bfloat16, device="cuda")
    params = [x, m.w13, m.w2, m.gate.weight]

    def ours():
        y = m(x)
        return torch.autograd.grad(y, params, dy) if train else y

    def peer():
        y = torch_moe_layer(x, m.gate.weight, m.bias, m.w13, m.w2, topk, n_group, topk_group)
        return torch.autograd.grad(y, params, dy.float()) if train else y
    if not train:
        ours, peer = torch.no_grad()(ours), torch.no_grad()(peer)
    flops = 2 * T * topk * dim * 3 * inter * (3 if train else 1)
    report(op="moe_layer_" + ("train" if train else "forward"), backend="fp8" if fp8 else "bf16",
           shape={"layer": layer, "T": T, "dim": dim, "inter": inter, "experts": E, "topk": topk},
           fn=ours, flops=flops, bound="fp8_TFLOPS" if fp8 else "bf16_TFLOPS", peer="torch._grouped_mm bf16 layer",
           peer_fn=peer, headline="eager")
