"""The reference model (model/) on one GPU.

Training: steps of model.train in BF16 and in FP8 on the small and bench presets (tokens/s and MFU of
the steps after a warmup, FP8 counted at the BF16 peak as DeepSeek-V3 reports it), and the step's GPU
time by kind of kernel from a profile of two more steps: the GEMMs (dense FP8, grouped, cuBLAS bf16),
the attention core, routing/permute/combine, quantization, the optimizer and the rest (norms, casts,
elementwise), with the FP8 GEMMs' speedup over the BF16 ones and the step speedup that implies.

Decode: one step at batch 32 of the bench preset (random weights cast to bf16 once, bf16_weights) over
caches filled to 4k and 16k tokens, the absorbed path (latent cache, dskernels.mla) against the naive one
(per-head K and V cached, torch's scaled_dot_product_attention), and the MTP speculative step (draft +
two-token verify); bytes count the weights and the cache each step reads.
"""
import re
import statistics

import pytest
import torch

from bench.conftest import file_record
from model.config import preset
from model.generate import Generator, PagedCache, bf16_weights
from model.model import Transformer
from model.train import TrainConfig, flops_per_token, train

TRAIN = {  # per preset: the step (tokens = batch_size x seq_len), steps timed after WARM, steps profiled
    "small": (dict(batch_size=16, seq_len=256), 40),
    "bench": (dict(batch_size=8, seq_len=4096, micro_batches=4), 6),  # 32768 tokens in 4 passes of 8192
}
WARM, PROFILED = 3, 2

# Kernel kinds by name, first match wins (attention before the GEMMs: CUTLASS's fmha kernels say cutlass).
KINDS = [
    ("attention core", r"flash|fmha|attention|cudnn|mla_"),
    # (the CUDA grouped GEMMs are fp8_gemm_kernel<..., GemmLayout 1-3>; the dense one has layout 0)
    ("grouped GEMM (experts)",
     r"_grouped_gemm_kernel|_k_grouped_kernel|GemmLayout\)[123]|GemmLayout::k[CMK]|GemmLayoutE[123]"),
    ("FP8 GEMM (dense)", r"fp8_gemm_kernel"),
    ("BF16 GEMM (cuBLAS)", r"gemm|nvjet|xmma|cutlass|sm90_|wgrad|dgrad"),
    ("routing, permute, combine", r"_route_kernel|_layout_|_permute_kernel|_combine"),
    ("FP8 quantization, SwiGLU", r"quant|_swiglu"),
    ("optimizer", r"multi_tensor|adam"),
    ("other (norms, casts, elementwise)", r""),
]
GEMM_KINDS = ("FP8 GEMM (dense)", "grouped GEMM (experts)", "BF16 GEMM (cuBLAS)")


def kind_of(name: str) -> str:
    return next(kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE))


def profiled_train(cfg: TrainConfig, steps: int):
    """model.train over WARM + steps + 1 + PROFILED steps, the last PROFILED under torch.profiler (the
    one before them its warmup, untimed) -> (log, {kind: GPU ms per step}, the costliest kernels of the
    last kind, "other", [(name, ms per step)])."""
    from torch.profiler import ProfilerActivity, profile, schedule
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU  # (a CPU dry run)
    with profile(activities=[activity],
                 schedule=schedule(wait=WARM + steps, warmup=1, active=PROFILED, repeat=1)) as prof:
        _, log = train(cfg, on_step=lambda _: prof.step())
    kinds, other = {k: 0.0 for k, _ in KINDS}, []
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
            ms, kind = event.self_device_time_total / 1e3 / PROFILED, kind_of(event.key)
            kinds[kind] += ms
            if kind == KINDS[-1][0]:
                other.append((event.key[:120], round(ms, 2)))
    return log, kinds, sorted(other, key=lambda t: -t[1])[:8]


@pytest.mark.parametrize("name", list(TRAIN))
def test_training_step(name):
    """tokens/s and MFU of BF16 and FP8 training, the step's time by kind of kernel."""
    extra, steps = TRAIN[name]
    runs = {}
    for precision in ("bf16", "fp8"):
        cfg = TrainConfig(preset=name, precision=precision, steps=WARM + steps + 1 + PROFILED, warmup=2, device="cuda",
                          quiet=True, **extra)
        log, kinds, other = profiled_train(cfg, steps)
        timed = log[WARM:WARM + steps]
        step_ms = statistics.median(cfg.batch_size * cfg.seq_len / r["tokens_per_s"] for r in timed) * 1e3
        runs[precision] = dict(step_ms=step_ms, tokens_per_s=cfg.batch_size * cfg.seq_len / step_ms * 1e3,
                               mfu=statistics.median(r["mfu"] for r in timed), kinds=kinds, loss=timed[-1]["loss"],
                               other=other)
        torch.cuda.empty_cache()
    with torch.device("meta"):
        per_token = flops_per_token(Transformer(preset(name)), extra["seq_len"])
    b, f = runs["bf16"], runs["fp8"]
    gemm = {p: sum(r["kinds"][k] for k in GEMM_KINDS) for p, r in runs.items()}
    quant = f["kinds"]["FP8 quantization, SwiGLU"] - b["kinds"]["FP8 quantization, SwiGLU"]
    gpu = {p: sum(r["kinds"].values()) for p, r in runs.items()}
    for precision, r in runs.items():
        rec = {"op": "model_train_step", "backend": precision, "kind": "model",
               "shape": {"preset": name, "tokens": extra["batch_size"] * extra["seq_len"],
                         "micro_batches": extra.get("micro_batches", 1)},
               "step_ms": round(r["step_ms"], 2), "tokens_per_s": round(r["tokens_per_s"]),
               "mfu": round(r["mfu"], 4), "flops_per_token": per_token, "gpu_ms": round(gpu[precision], 2),
               "breakdown_ms": {k: round(v, 2) for k, v in r["kinds"].items()}, "other_kernels_ms": r["other"],
               "last_loss": round(r["loss"], 4)}
        if precision == "fp8":
            # The step with the FP8 GEMMs (and the quantization they need) in place of the BF16 ones, the rest
            # as BF16 ran it: what the GEMMs alone buy end to end.
            bound = b["step_ms"] / (b["step_ms"] - gemm["bf16"] + gemm["fp8"] + quant)
            rec.update(speedup_vs_bf16=round(b["step_ms"] / f["step_ms"], 3),
                       gemm_speedup=round(gemm["bf16"] / gemm["fp8"], 3),
                       gemm_share_of_bf16_step=round(gemm["bf16"] / b["step_ms"], 3),
                       speedup_bound_from_gemms=round(bound, 3))
        file_record(rec)
    print(name, runs)


def bench_model(context: int):
    torch.manual_seed(0)
    args = preset("bench", max_seq_len=context + 64)
    with torch.device("cuda"):
        model = Transformer(args).eval()
    return bf16_weights(model)


def fill(cache: PagedCache, context: int):
    """Every cache row random (as a prefill would leave them, in scale), every sequence `context` long."""
    g = torch.Generator(device="cuda").manual_seed(context)
    for kv in cache.caches + [cache.mtp_cache]:
        for t in kv if isinstance(kv, tuple) else (kv,):
            t.normal_(generator=g)
    cache.seqlens.fill_(context)
    cache.mtp_seqlens.fill_(context - 2)


def decode_setup(model, context: int, attention: str, B: int = 32):
    """A Generator of the bench model (no graphs of its own: the timer captures) and a cache filled to
    `context` -> (gen, cache, bytes a decode step reads: the weights, the cache)."""
    a = model.args
    gen = Generator(model, attention=attention, cuda_graph=False)
    cache = PagedCache(model, B, context + 8, "cuda", attention)
    fill(cache, context)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if not n.startswith(("embed", "mtp")))
    per_token = a.n_heads * (a.qk_head_dim + a.v_head_dim) * 2 if attention == "naive" else \
        (a.kv_lora_rank + a.qk_rope_head_dim) * 2
    return gen, cache, weights + B * context * a.n_layers * per_token


@pytest.mark.parametrize("context", [4096, 16384])
def test_decode_step(report, context):
    """One decode step at batch 32, absorbed against naive, the same context every call."""
    B = 32
    tokens = torch.randint(0, 256, (B,), device="cuda")
    steps, model = {}, bench_model(context)
    for attention in ("naive", "absorb"):
        gen, cache, moved = decode_setup(model, context, attention, B)

        def step(gen=gen, cache=cache):
            cache.seqlens.fill_(context)
            return gen.decode(cache, tokens)
        steps[attention] = (step, moved)
    (naive, naive_bytes), (absorb, absorb_bytes) = steps["naive"], steps["absorb"]
    rec = report(op="model_decode_step", backend="absorb", shape={"preset": "bench", "batch": B, "context": context},
                 fn=absorb, bytes_moved=absorb_bytes, bound="copy_GBps",
                 peer="naive attention (per-head K, V cache; SDPA)", peer_fn=naive, headline="graph",
                 extra={"naive_bytes": naive_bytes})
    rec.update(tokens_per_s=round(B / rec["graph_us"] * 1e6), naive_tokens_per_s=round(B / rec["peer_graph_us"] * 1e6))
    file_record(rec)


@pytest.mark.parametrize("context", [4096, 16384])
def test_decode_speculative_step(report, context):
    """The MTP speculative step at batch 32 (absorbed): the MTP block drafts, the main model verifies two
    tokens a sequence; beside the plain step. Random weights accept nothing meaningful (DeepSeek-V3
    reports 85-90 % for its second token), so the record gives tokens/s at 85 % and the acceptance rate
    at which speculation breaks even."""
    B = 32
    model = bench_model(context)
    gen, cache, moved = decode_setup(model, context, "absorb", B)
    tokens = torch.randint(0, 256, (B,), device="cuda")
    state = {"hidden": torch.randn(B, 2, model.args.dim, device="cuda"), "t": tokens.clone(), "prev": tokens.clone(),
             "emit": torch.zeros(B, 3, dtype=torch.long, device="cuda")}

    def plain():
        cache.seqlens.fill_(context)
        return gen.decode(cache, tokens)

    def speculative():
        cache.seqlens.fill_(context)
        cache.mtp_seqlens.fill_(context - 2)
        gen._speculative_step(cache, state)
    rec = report(op="model_decode_speculative", backend="absorb", shape={"preset": "bench", "batch": B,
                                                                         "context": context},
                 fn=speculative, bytes_moved=moved, bound="copy_GBps", peer="plain decode step", peer_fn=plain,
                 headline="graph")
    spec_us, plain_us = rec["graph_us"], rec["peer_graph_us"]
    rec.update(tokens_per_s_at_85pct=round(B * 1.85 / spec_us * 1e6), plain_tokens_per_s=round(B / plain_us * 1e6),
               break_even_acceptance=round(spec_us / plain_us - 1, 3))
    file_record(rec)
