"""DeepSeek-V3's shapes, defined once for the conformance tests and the benchmarks.

hidden 7168, 128 heads, q_lora 1536, kv_lora 512 (+64 RoPE), MoE intermediate 2048, 256 experts top-8.
"""
HIDDEN = 7168

# Dense GEMM (N, K) pairs: q_a/kv_a projections (2112 = 1536 + 576), q_b (24576 = 128 x 192),
# kv_b (32768 = 128 x 256), o_proj-like (7168 x 16384), shared-expert up/gate and down.
GEMM_NK = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
           (7168, 2048)]
GEMM_M = [64, 128, 4096]

# Quantization: activations of the dense GEMMs' inputs, and their weights.
QUANT_ACTIVATIONS = [(4096, 7168), (128, 7168), (4096, 2048), (4096, 1536)]
QUANT_WEIGHTS = [(7168, 2048), (2112, 7168), (24576, 1536)]

# Small, odd shapes every backend must get right (cheap enough for the Triton CPU interpreter):
# M = 1, K not a multiple of 128 (or of 8), a row count just past a block, tall and thin.
QUANT_ODD = [(1, 128), (1, 7), (3, 200), (64, 256), (129, 384), (130, 1000), (257, 136)]
