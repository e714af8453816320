"""Compile every Triton kernel for a GPU generation on this machine, without a GPU, and report what
the PTX holds. Run by test_triton_compile.py in a subprocess without TRITON_INTERPRET (under the
interpreter the kernels are not JIT functions), so CI catches what only the compiler rejects (the
interpreter accepts more), for each generation dskernels.backend.SUPPORT lets the Triton kernels run on
(sm_89, sm_90, sm_100), and sees whether the matrix products lower to wgmma on Hopper.

    python -m conformance.triton_compile [CAPABILITY]    one JSON line per kernel (default 90)
"""
import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dskernels.triton import gemm as tg
from dskernels.triton import grouped_gemm as tgg
from dskernels.triton import mla as tm
from dskernels.triton import moe as tmoe
from dskernels.triton import quant as tq


def kernels():
    """(name, jit function, signature, constexprs, options) for each kernel variant worth compiling."""
    quant_sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "R": "i32", "C": "i32",
                 "stride_xr": "i32", "stride_xc": "i32", "stride_qr": "i32", "stride_sr": "i32", "stride_sc": "i32"}
    for whole, block_r, pow2 in [(False, 16, False), (False, 64, True), (True, 128, False)]:
        yield (f"quant(whole_tile={whole}, pow2={pow2})", tq._quant_kernel, quant_sig,
               {"POW2": pow2, "WHOLE_TILE": whole, "BLOCK_R": block_r, "EMULATE": False}, {"num_warps": 4})
    deq_sig = {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "out_ptr": "*bf16", "R": "i32", "C": "i32", "stride_qr": "i32",
               "stride_sr": "i32", "stride_sc": "i32", "stride_or": "i32"}
    yield ("dequant", tq._dequant_kernel, deq_sig, {"SCALE_ROWS": 128, "BLOCK_R": 16, "EMULATE": False},
           {"num_warps": 4})
    gemm_sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "out_ptr": "*bf16", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
                "M": "i32", "N": "i32", "K": "i32", "stride_sa_m": "i32", "stride_sa_k": "i32",
                "stride_sb_n": "i32", "stride_sb_k": "i32"}
    for cfg in tg._fp8_gemm_kernel.configs:
        for per_row, acc, out in [(False, False, "*bf16"), (True, True, "*fp32")]:
            yield (f"fp8_gemm({cfg}, b_per_row={per_row})", tg._fp8_gemm_kernel.fn, {**gemm_sig, "out_ptr": out},
                   {"B_PER_ROW": per_row, "ACCUMULATE": acc, "EMULATE": False, **cfg.kwargs},
                   {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    grouped_sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "out_ptr": "*bf16", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
                   "rows_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "G": "i32",
                   "stride_sa_g": "i32", "stride_sa_m": "i32", "stride_sa_k": "i32", "stride_ag": "i32",
                   "stride_am": "i32", "stride_ak": "i32", "stride_bg": "i32", "stride_bn": "i32", "stride_bk": "i32"}
    bf16_sig = {**grouped_sig, "a_ptr": "*bf16", "b_ptr": "*bf16", "sa_ptr": "*bf16", "sb_ptr": "*bf16"}
    def split(cfg):  # a grouped config: (constexprs, compile options)
        return ({k: v for k, v in cfg.items() if k.isupper()}, {k: v for k, v in cfg.items() if not k.isupper()})
    for cfg in tgg.CONFIGS:
        meta, opts = split(cfg)
        for fp8 in (True, False):
            for masked in (False, True):
                yield (f"{'fp8' if fp8 else 'bf16'}_gemm_grouped({cfg}, masked={masked})", tgg._grouped_gemm_kernel,
                       grouped_sig if fp8 else bf16_sig,
                       {"FP8": fp8, "MASKED": masked, "BLOCK_K": 128 if fp8 else 64, "EMULATE": False, **meta}, opts)
    k_sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "out_ptr": "*fp32", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
             "off_ptr": "*i32", "M": "i32", "N": "i32", "K_TOTAL": "i32", "stride_sa_m": "i32",
             "stride_sa_k": "i32", "stride_sb_n": "i32", "stride_sb_k": "i32", "stride_am": "i32", "stride_ak": "i32",
             "stride_bn": "i32", "stride_bk": "i32"}
    for cfg in tgg.CONFIGS:
        meta, opts = split(cfg)
        yield (f"fp8_gemm_k_grouped({cfg})", tgg._k_grouped_kernel, k_sig,
               {"ACCUMULATE": True, "FP8": True, "BLOCK_K": 128, "EMULATE": False, **meta}, opts)
        yield (f"bf16_gemm_k_grouped({cfg})", tgg._k_grouped_kernel,
               {**k_sig, "a_ptr": "*bf16", "b_ptr": "*bf16", "sa_ptr": "*bf16", "sb_ptr": "*bf16"},
               {"ACCUMULATE": True, "FP8": False, "BLOCK_K": 64, "EMULATE": False, **meta}, opts)
    perm_sig = {"x_ptr": "*bf16", "tok_ptr": "*i32", "out_ptr": "*bf16", "s_ptr": "*fp32", "T": "i32", "D": "i32",
                "stride_x": "i32", "stride_out": "i32", "stride_sr": "i32", "stride_sg": "i32"}
    yield ("moe_permute", tmoe._permute_kernel, perm_sig, {"FP8": False, "POW2": False, "GROUPS": 8,
                                                           "EMULATE": False}, {"num_warps": 4})
    yield ("moe_permute(fp8)", tmoe._permute_kernel, {**perm_sig, "out_ptr": "*fp8e4nv"},
           {"FP8": True, "POW2": True, "GROUPS": 8, "EMULATE": False}, {"num_warps": 4})
    moe_sig = {"y_ptr": "*bf16", "slot_ptr": "*i32", "w_ptr": "*fp32", "out_ptr": "*bf16", "R": "i32", "D": "i32",
                "stride_y": "i32", "stride_out": "i32"}
    for weighted in (True, False):
        yield (f"moe_combine(weighted={weighted})", tmoe._combine_kernel, moe_sig,
               {"K": 8, "WEIGHTED": weighted, "BLOCK_D": 1024, "EMULATE": False},
               {"num_warps": 4, "enable_fp_fusion": False})
    bwd_sig = {"g_ptr": "*bf16", "y_ptr": "*bf16", "tok_ptr": "*i32", "slot_ptr": "*i32", "w_ptr": "*fp32",
               "gy_ptr": "*bf16", "gw_ptr": "*fp32", "T": "i32", "D": "i32", "stride_g": "i32", "stride_y": "i32",
               "stride_gy": "i32"}
    yield ("moe_combine_backward", tmoe._combine_backward_kernel, bwd_sig,
           {"K": 8, "BLOCK_D": 1024, "EMULATE": False}, {"num_warps": 4, "enable_fp_fusion": False})
    route_sig = {"s_ptr": "*fp32", "bias_ptr": "*fp32", "idx_ptr": "*i32", "counts_ptr": "*i32", "T": "i32",
                 "E": "i32", "PER": "i32", "stride_s": "i32"}
    for groups, topk_group, per_pad in [(8, 4, 32), (1, 1, 64)]:  # DeepSeek-V3's 256 experts in 8 groups; 64 flat
        yield (f"moe_route(groups={groups})", tmoe._route_kernel, route_sig,
               {"HAS_BIAS": True, "N_GROUP": groups, "TOPK_GROUP": topk_group, "TOPK": 8, "BLOCK_T": 16,
                "G_PAD": groups, "PER_PAD": per_pad}, {"num_warps": 4})
    yield ("moe_layout_hist", tmoe._layout_hist_kernel,
           {"idx_ptr": "*i32", "hist_ptr": "*i32", "mind_ptr": "*i32", "tok_ptr": "*i32", "S": "i32", "E": "i32",
            "ROWS": "i32", "ROWS_PER_PROGRAM": "i32"}, {"BLOCK_S": 128, "E_PAD": 256, "BLOCK_R": 256}, {"num_warps": 4})
    yield ("moe_layout_scan", tmoe._layout_scan_kernel,
           {"hist_ptr": "*i32", "offs_ptr": "*i32", "counts_ptr": "*i32", "NB": "i32", "E": "i32"},
           {"BLOCK_B": 256, "BLOCK_E": 16}, {"num_warps": 4})
    yield ("moe_layout_scatter", tmoe._layout_scatter_kernel,
           {"idx_ptr": "*i32", "offs_ptr": "*i32", "counts_ptr": "*i32", "start_ptr": "*i32", "row_of_slot_ptr": "*i32",
            "mind_ptr": "*i32", "tok_ptr": "*i32", "S": "i32", "E": "i32", "K": "i32", "STRIDE": "i32"},
           {"ALIGN": 128, "BLOCK_S": 128, "E_PAD": 256}, {"num_warps": 4})
    swiglu_sig = {"h_ptr": "*bf16", "tok_ptr": "*i32", "out_ptr": "*bf16", "s_ptr": "*fp32", "I": "i32",
                  "stride_h": "i32", "stride_out": "i32", "stride_sr": "i32", "stride_sg": "i32"}
    yield ("moe_swiglu", tmoe._swiglu_kernel, swiglu_sig, {"FP8": False, "POW2": False, "GROUPS": 8,
                                                           "EMULATE": False}, {"num_warps": 4})
    yield ("moe_swiglu(fp8)", tmoe._swiglu_kernel, {**swiglu_sig, "out_ptr": "*fp8e4nv"},
           {"FP8": True, "POW2": False, "GROUPS": 8, "EMULATE": False}, {"num_warps": 4})
    yield ("moe_swiglu_backward", tmoe._swiglu_backward_kernel,
           {"h_ptr": "*bf16", "d_ptr": "*bf16", "tok_ptr": "*i32", "dh_ptr": "*bf16", "I": "i32", "stride_h": "i32",
            "stride_d": "i32", "stride_dh": "i32"}, {"BLOCK": 1024, "EMULATE": False}, {"num_warps": 4})
    split_sig = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "bt_ptr": "*i32", "seqlens_ptr": "*i32", "items_ptr": "*i32",
                 "offsets_ptr": "*i32", "bad_ptr": "*i32", "made_seqlens_ptr": "*i32", "made_hash_ptr": "*i32",
                 "error_ptr": "*i32", "o_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "lse_out_ptr": "*fp32",
                 "num_pages": "i32", "page_stride": "i32", "bt_stride": "i32", "max_pages": "i32", "rows": "i32",
                 "H": "i32", "S_Q": "i32", "scale_log2": "fp32"}
    for block_h in (16, 32, 64):
        yield (f"mla_split(BLOCK_H={block_h})", tm._mla_split_kernel, split_sig,
               {"CAUSAL": True, "FP8_CACHE": False, "BLOCK_H": block_h, "EMULATE": False},
               {"num_warps": 8, "num_stages": 2})
    yield ("mla_split(BLOCK_H=64, fp8 cache)", tm._mla_split_kernel, {**split_sig, "cache_ptr": "*u8"},
           {"CAUSAL": True, "FP8_CACHE": True, "BLOCK_H": 64, "EMULATE": False}, {"num_warps": 8, "num_stages": 2})
    comb_sig = {"o_ptr": "*fp32", "lse_ptr": "*fp32", "offsets_ptr": "*i32", "bad_ptr": "*i32", "out_ptr": "*bf16",
                "lse_out_ptr": "*fp32", "rows": "i32", "H": "i32", "S_Q": "i32"}
    yield ("mla_combine", tm._mla_combine_kernel, comb_sig, {"BLOCK_R": 16, "EMULATE": False}, {"num_warps": 4})
    app_sig = {"cache_ptr": "*bf16", "bt_ptr": "*i32", "seqlens_ptr": "*i32", "kv_ptr": "*bf16", "pe_ptr": "*bf16",
               "num_pages": "i32", "page_stride": "i32", "bt_stride": "i32", "max_pages": "i32", "S": "i32"}
    yield ("mla_append", tm._append_kernel, app_sig, {"FP8_CACHE": False, "EMULATE": False}, {"num_warps": 4})
    yield ("mla_append(fp8 cache)", tm._append_kernel, {**app_sig, "cache_ptr": "*u8"},
           {"FP8_CACHE": True, "EMULATE": False}, {"num_warps": 4})


def compile_all(capability: int):
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    target = GPUTarget("cuda", capability, 32)
    for name, fn, sig, constexprs, options in kernels():
        sig = {**sig, **{k: "constexpr" for k in constexprs}}
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target, options=options)
            ptx = k.asm["ptx"]
            row = {"kernel": name, "ok": True, "wgmma": ptx.count("wgmma.mma_async"),
                   "spills": k.n_spills if hasattr(k, "n_spills") else None, "regs": getattr(k, "n_regs", None)}
        except Exception as e:  # report every failure, not just the first
            row = {"kernel": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
