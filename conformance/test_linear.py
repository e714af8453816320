"""FP8 Linear layers (dskernels.linear): FP8Linear and fp8_linear against the reference recipe written out
here from the specification's ops (tier 1: the same quantized operands, so only GEMM summation differs)
and against bf16 nn.Linear (tier 2); the weight cache (re-quantized after every in-place update, used
otherwise); gradient accumulation over micro-batches (autograd's and the fused fp32 main grad) equal to
one large batch; the no-grad forward's work; torch.compile(fullgraph=True), CUDA-graph capture and DDP
(gloo, two ranks on the CPU); bad input."""
import os

import pytest
import torch
import torch.nn.functional as F

import dskernels
import dskernels.linear as lin
from conformance.conftest import DEVICE, ON_GPU, as_bytes, backends_for, gpu_only, random_input, seed_of, twice_poisoned
from conformance.tolerances import assert_finite, diff, max_rel_error
from dskernels import FP8Linear, fp8_linear
from dskernels.reference import gemm as rg
from dskernels.reference import quant as rq

BACKENDS = backends_for("fp8_gemm")
M, K = (250, 256) if not ON_GPU else (1000, 2048)  # a token count that is not a multiple of 128
# Tier 1: the CUDA kernel's per-row error is at most 1.1e-3 of the row's magnitude (tolerances.py's
# calibration); a wrong operand, scale or padding is off by far more.
RECIPE_REL = 5e-3


def row_rel_error(got, want):
    """The largest per-row max |got - want| / max |want| (rows of very different magnitude each count)."""
    got, want = got.detach().double().reshape(-1, got.shape[-1]), want.double().reshape(-1, want.shape[-1])
    scale = want.abs().amax(1).clamp_min(1e-30)
    return float(((got - want).abs().amax(1) / scale).max())


def padded(t, dim):
    """t with zero rows (dim 0) or columns (dim 1) up to a multiple of 128, in t's own dtype."""
    pad = (-t.shape[dim]) % 128
    return F.pad(t, (0, pad) if dim == 1 else (0, 0, 0, pad))


def recipe(x, w, b, dy):
    """DeepSeek-V3's FP8 Linear from the specification's ops: fp32 y, dx, dW, db."""
    xq, xs = rq.per_token_group_quant(x)
    wq, ws = rq.per_block_quant(w)
    y = rg.fp8_gemm(xq, xs, wq, ws, torch.float32)
    # dx = dy W: dy per 1x128 along N (zero-padded), W^T [K, N] whose 128x128 blocks are W's transposed
    dyq, dys = rq.per_token_group_quant(padded(dy, 1))
    wtq, wts = rq.per_block_quant(padded(w.t().contiguous(), 1))
    dx = rg.fp8_gemm(dyq, dys, wtq, wts, torch.float32)
    # dW = dy^T x: both per 128 tokens (zero-padded), 1D1D
    dytq, dyts = rq.per_token_group_quant_transposed(padded(dy, 0))
    xtq, xts = rq.per_token_group_quant_transposed(padded(x, 0))
    dw = rg.fp8_gemm(dytq, dyts, xtq, xts, torch.float32)
    if b is not None:
        y = y + b.float()
    return y, dx, dw, None if b is None else dy.float().sum(0)


def layer_and_data(N, bias, seed, param_dtype=torch.float32, x_dtype=torch.float32, backend="auto"):
    torch.manual_seed(seed)
    layer = FP8Linear(K, N, bias=bias, device=DEVICE, dtype=param_dtype, backend=backend)
    x = random_input((M, K), x_dtype, seed=seed + 1, outliers=False).requires_grad_()
    dy = random_input((M, N), x_dtype, seed=seed + 2, outliers=False)
    return layer, x, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [384, 200], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_forward_and_gradients_follow_the_recipe(backend, N, bias):
    """y, dx, dW and db of FP8Linear against the recipe on the same data: the input gradient's
    reduction (N = 200) and the weight gradient's (M = 250) are padded; fp32 x and parameters, so every
    GEMM writes fp32."""
    layer, x, dy = layer_and_data(N, bias, seed_of("recipe", backend, N, bias), backend=backend)
    y = layer(x)
    y.backward(dy)
    want = recipe(x.detach().cpu(), layer.weight.detach().cpu(), None if not bias else layer.bias.detach().cpu(),
                  dy.cpu())
    got = (y, x.grad, layer.weight.grad, None if not bias else layer.bias.grad)
    for name, g, w in zip(("y", "dx", "dW", "db"), got, want):
        if w is None:
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert_finite(name, g)
        err = row_rel_error(g.cpu(), w) if g.dim() == 2 else max_rel_error(g.cpu(), w)
        assert err < RECIPE_REL, f"{name}: error {err:.3g} of a row's max |{name}| against the recipe"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [576, 200], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32_params", "bf16_params"])
def test_matches_bf16_linear(backend, N, param_dtype):
    """Tier 2: FP8Linear against nn.Linear in bf16 on the same data, with leading dims and a bias; diff
    is about the squared relative error (E4M3: ~1e-3)."""
    torch.manual_seed(seed_of("bf16", backend, N, str(param_dtype)))
    ref_layer = torch.nn.Linear(K, N, device=DEVICE, dtype=param_dtype)
    layer = FP8Linear.from_linear(ref_layer, backend=backend)
    x = random_input((2, M // 2, K), torch.bfloat16, seed=1, outliers=False).requires_grad_()
    dy = random_input((2, M // 2, N), torch.bfloat16, seed=2, outliers=False)
    y = layer(x)
    y.backward(dy)
    got = (y, x.grad, layer.weight.grad, layer.bias.grad)
    layer.weight.grad = layer.bias.grad = None
    x_ref = x.detach().clone().requires_grad_()
    w_ref = ref_layer.weight.detach().to(torch.bfloat16).requires_grad_()
    b_ref = ref_layer.bias.detach().to(torch.bfloat16).requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(dy)
    for name, g, w in zip(("y", "dx", "dW", "db"), got, (y_ref, x_ref.grad, w_ref.grad, b_ref.grad)):
        assert g.shape == w.shape, name
        assert_finite(name, g)
        d = diff(g, w)
        assert d < 2e-3, f"{name}: diff {d:.3g} vs bf16 nn.Linear"
    assert y.dtype == x.grad.dtype == torch.bfloat16
    assert got[2].dtype == got[3].dtype == param_dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_form_equals_the_module(backend):
    layer, x, dy = layer_and_data(384, True, 5, backend=backend)
    y = layer(x)
    y2 = fp8_linear(x, layer.weight, layer.bias, backend=backend)
    assert torch.equal(y, y2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wants", [(True, False), (False, True)], ids=["dx_only", "dW_only"])
def test_a_partial_backward_equals_the_full_one(backend, wants):
    """A frozen weight (input gradient only) or an input that needs no gradient (the first layer: weight
    gradient only) takes the single-layout quantizations; the gradients it computes are the full
    backward's, bit for bit (the kernels write the same bytes either way)."""
    layer, x, dy = layer_and_data(200, False, 37, backend=backend)
    y = layer(x)
    y.backward(dy)
    full = (y.detach(), x.grad, layer.weight.grad)
    x.grad = layer.weight.grad = None
    x.requires_grad_(wants[0])
    layer.weight.requires_grad_(wants[1])
    y = layer(x)
    y.backward(dy)
    assert torch.equal(y, full[0])
    assert (x.grad is not None) == wants[0] and (layer.weight.grad is not None) == wants[1]
    if wants[0]:
        assert torch.equal(x.grad, full[1])
    else:
        assert torch.equal(layer.weight.grad, full[2])


# --- the weight cache -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_updated_in_place_is_quantized_again(backend, monkeypatch):
    """Doubling the weight in place doubles y exactly (the scales double, the e4m3 bytes stay): a stale
    cache would give the old y. An optimizer step is picked up the same way; unchanged, the cache is used."""
    layer, x, _ = layer_and_data(384, False, 7, backend=backend)
    calls = []
    quantize = lin.quantize_weight
    monkeypatch.setattr(lin, "quantize_weight", lambda *a, **k: calls.append(1) or quantize(*a, **k))
    y1 = layer(x).detach()
    assert torch.equal(layer(x), y1) and len(calls) == 1, "an unchanged weight is quantized once"
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(layer(x).detach(), 2 * y1), "the in-place update was not picked up"
    # (fused AdamW writes the parameters without advancing their version counters; SGD and foreach do)
    for opt in (torch.optim.SGD(layer.parameters(), lr=0.1), torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True),
                torch.optim.AdamW(layer.parameters(), lr=0.1, foreach=True)):
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        fresh = FP8Linear.from_linear(torch.nn.Linear(K, 384, bias=False), backend=backend).to(DEVICE)
        with torch.no_grad():
            fresh.weight.copy_(layer.weight)
        assert torch.equal(layer(x), fresh(x)), f"the {type(opt).__name__} step was not picked up"
    assert len(calls) == 2 + 3 * 2  # (each step: the check's quantization and the fresh layer's)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_made_per_call_are_never_served_from_the_cache(backend):
    """torch.func.functional_call with a new weight each call, and a parametrized weight (weight_norm)
    updated by SGD: every forward uses the weight of that call (a cache keyed on address and version
    alone hands out a stale one: a freed tensor's address is reused and a new tensor's version is 0)."""
    layer, x, _ = layer_and_data(384, False, 41, backend=backend)
    x = x.detach()
    for i in range(4):
        w = layer.weight.detach() * (i + 1)
        got = torch.func.functional_call(layer, {"weight": w}, (x,))
        want = fp8_linear(x, w, backend=backend)
        assert torch.equal(got, want), f"call {i}: a stale weight"
    norm = torch.nn.utils.parametrizations.weight_norm(FP8Linear(K, 384, bias=False, device=DEVICE,
                                                                 backend=backend))
    opt = torch.optim.SGD(norm.parameters(), lr=0.5)
    for step in range(3):
        y = norm(x)
        assert torch.equal(y, fp8_linear(x, norm.weight.detach(), backend=backend)), f"step {step}: a stale weight"
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_then_training(backend):
    """A forward under torch.inference_mode (a validation pass) does not leave inference tensors in the
    cache for the next training step, which would refuse to save them for backward."""
    layer, x, dy = layer_and_data(200, True, 43, backend=backend)
    with torch.inference_mode():
        y0 = layer(x.detach())
    y = layer(x)
    y.backward(dy)
    assert torch.equal(y.detach(), y0) and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    """An empty batch (an MoE expert that received no tokens) gives an empty output and zero gradients."""
    layer, _, _ = layer_and_data(200, True, 47, backend=backend)
    x = torch.zeros(0, K, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 200)
    y.sum().backward()
    assert (layer.weight.grad == 0).all() and (layer.bias.grad == 0).all() and x.grad.shape == (0, K)


# --- gradient accumulation, the no-grad forward ----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "main_grad"])
def test_micro_batches_accumulate_to_the_large_batch(backend, fused):
    """Two micro-batches of 128 tokens, each with its backward, give the weight gradient of one batch of
    256 (the quantization tiles are the same 128 tokens, so the sums agree to fp32 rounding), both with
    autograd's accumulation into weight.grad and the GEMM's own into weight.main_grad."""
    torch.manual_seed(11)
    layer = FP8Linear(K, 384, bias=False, device=DEVICE, backend=backend, fuse_wgrad_accumulation=fused)
    x = random_input((256, K), torch.bfloat16, seed=12, outliers=False)
    dy = random_input((256, 384), torch.bfloat16, seed=13, outliers=False)

    def grad_of(*slices):
        layer.weight.grad, layer.weight.main_grad = None, None
        for sl in slices:
            layer(x[sl]).backward(dy[sl])
        if fused:
            assert layer.weight.grad is None
            return layer.weight.main_grad
        return layer.weight.grad
    split = grad_of(slice(0, 128), slice(128, 256)).clone()
    whole = grad_of(slice(0, 256)).clone()
    assert split.dtype == torch.float32
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6 * whole.abs().max().item())
    layer.fuse_wgrad_accumulation, layer.weight.main_grad = False, None
    layer.weight.grad = None
    layer(x).backward(dy)  # the same gradient through autograd: the fused path wrote the real one
    torch.testing.assert_close(whole, layer.weight.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_does_the_forward_only(backend, monkeypatch):
    layer, x, _ = layer_and_data(200, True, 17, backend=backend)
    y = layer(x).detach()

    def refuse(*args, **kwargs):
        raise AssertionError("a no-grad forward quantized for a backward")
    layer.invalidate_weight_cache()
    monkeypatch.setattr(lin, "both_unchecked", refuse)
    monkeypatch.setattr(lin, "_transpose", refuse)  # W^T's copy serves only the input gradient
    monkeypatch.setattr(lin, "blocks_both_unchecked", refuse)
    with torch.no_grad():
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [384, 200], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_and_its_transpose_in_one_pass(backend, N, dtype):
    """quantize_weight makes W and W^T (N zero-padded to 128) from one read of W where the CUDA kernel
    runs: the same bytes and scales as per_block_quant and transposing its result."""
    w = random_input((N, 512), dtype, seed=41, device=DEVICE, outliers=False)
    got = twice_poisoned(lambda: lin.quantize_weight(w, backend=backend))
    q, s = dskernels.per_block_quant(w, backend=backend)
    want = [q, s, lin._pad_dim(q.t().contiguous(), 1), s.t().contiguous()]
    for name, g, x in zip(("q", "scale", "q_t", "scale_t"), got, want):
        assert g.shape == x.shape and g.is_contiguous(), name
        assert torch.equal(as_bytes(g), as_bytes(x)), name


# --- tracing, graphs, DDP ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", *(["auto"] if ON_GPU else [])])
def test_training_step_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) of an FP8Linear forward and loss (from torch 2.12 on; on older torch
    the layer's autograd function runs eagerly inside the compiled program, so there this checks the
    graph break, not the traced function); its backward (AOTAutograd's) gives the gradients of the eager
    step bit for bit. The loss (y * c).sum() has the gradient c exactly in both modes, so the quantized
    operands, and hence the GEMMs, are the same."""
    layer, x, _ = layer_and_data(200, True, 19, backend=backend)
    c = random_input((M, 200), torch.float32, seed=20, outliers=False)

    def loss_of(t):
        return (layer(t).float() * c).sum()
    loss_of(x).backward()
    eager = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    x.grad = layer.weight.grad = layer.bias.grad = None
    # torch 2.11 returns zero gradients here (pytorch/pytorch#180642): FP8Linear then runs the function
    # eagerly inside the compiled program (a graph break), so fullgraph is asked only from 2.12 on
    fullgraph = torch.torch_version.TorchVersion(torch.__version__) >= (2, 12)
    torch.compile(loss_of, fullgraph=fullgraph, backend="aot_eager")(x).backward()
    for name, g, w in zip(("dx", "dW", "db"), (x.grad, layer.weight.grad, layer.bias.grad), eager):
        assert torch.equal(g, w), name


@gpu_only
def test_training_step_replays_from_a_cuda_graph():
    """A captured forward + backward, replayed after the weight and the input changed in place, gives the
    eager step's results on the new values: under capture the weight is quantized inside the graph."""
    layer, x, dy = layer_and_data(576, True, 23, param_dtype=torch.float32, x_dtype=torch.bfloat16)
    static_x = x.detach().clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the capture
            layer.weight.grad = layer.bias.grad = static_x.grad = None
            layer(static_x).backward(dy)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    layer.weight.grad = layer.bias.grad = static_x.grad = None
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.backward(dy)
    with torch.no_grad():
        layer.weight.mul_(0.5)
        static_x.copy_(random_input((M, K), torch.bfloat16, seed=29, outliers=False))
    layer.weight.grad.zero_(), layer.bias.grad.zero_(), static_x.grad.zero_()
    graph.replay()
    got = (static_y.clone(), static_x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.weight.grad = layer.bias.grad = None
    x2 = static_x.detach().clone().requires_grad_()
    y2 = layer(x2)
    y2.backward(dy)
    for name, g, w in zip(("y", "dx", "dW", "db"), got, (y2, x2.grad, layer.weight.grad, layer.bias.grad)):
        assert torch.equal(g, w), name


def _ddp_rank(rank, world, port, path):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(31)
    layer = FP8Linear(256, 200, backend="reference")
    model = torch.nn.parallel.DistributedDataParallel(layer)
    x = random_input((256, 256), torch.float32, seed=32, device="cpu", outliers=False)
    dy = random_input((256, 200), torch.float32, seed=33, device="cpu", outliers=False)
    half = slice(128 * rank, 128 * (rank + 1))
    model(x[half]).backward(dy[half])
    if rank == 0:
        torch.save({"weight": layer.weight.grad, "bias": layer.bias.grad}, path)
    dist.destroy_process_group()


def test_ddp_averages_the_ranks_gradients(tmp_path):
    """Two gloo ranks on the CPU, 128 tokens each: DDP's averaged gradients equal half the gradients of
    one process over all 256 tokens (the same quantization tiles)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_rank, args=(2, port, path), nprocs=2, join=True)
    got = torch.load(path)
    torch.manual_seed(31)
    layer = FP8Linear(256, 200, backend="reference")
    x = random_input((256, 256), torch.float32, seed=32, device="cpu", outliers=False)
    dy = random_input((256, 200), torch.float32, seed=33, device="cpu", outliers=False)
    layer(x).backward(dy)
    torch.testing.assert_close(got["weight"], layer.weight.grad / 2, rtol=1e-5, atol=1e-6)
    # the bias gradient is a plain fp32 sum over tokens: 128 + 128 against 256 in another order
    torch.testing.assert_close(got["bias"], layer.bias.grad / 2, rtol=1e-4, atol=1e-5 * layer.bias.grad.abs().max())


# --- bad input -----------------------------------------------------------------------------------

def test_refuses_what_cannot_work():
    x = random_input((8, 200), torch.bfloat16)
    with pytest.raises(ValueError, match=r"x's last dimension \(in_features.*multiple of 128, got 200"):
        fp8_linear(x, random_input((64, 200), torch.bfloat16))
    with pytest.raises(ValueError, match=r"weight must be \[out_features, 256\]"):
        fp8_linear(random_input((8, 256), torch.bfloat16), random_input((64, 128), torch.bfloat16))
    with pytest.raises(TypeError, match="weight must have dtype"):
        fp8_linear(random_input((8, 256), torch.bfloat16), torch.ones(64, 256, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must be \[64\]"):
        fp8_linear(random_input((8, 256), torch.bfloat16), random_input((64, 256), torch.bfloat16),
                   random_input((63,), torch.bfloat16))
    with pytest.raises(ValueError, match=r"in_features must be a multiple of 128 .*got 100"):
        FP8Linear(100, 64)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        FP8Linear.from_linear(torch.nn.Conv1d(128, 128, 1))
    with pytest.raises(TypeError, match="fuse_wgrad_accumulation must be a bool"):
        FP8Linear(128, 64, fuse_wgrad_accumulation="yes")
    fused = FP8Linear(128, 64, device=DEVICE, fuse_wgrad_accumulation=True)
    fused.weight.main_grad = torch.zeros(64, 128, device="meta")
    with pytest.raises(ValueError, match="weight.main_grad must be a contiguous float32 tensor"):
        fused(random_input((8, 128), torch.float32)).sum().backward()
    assert dskernels.FP8Linear is FP8Linear
