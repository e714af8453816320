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

# The dense GEMM's broad grid, beyond DeepSeek-V3: (N, K) of other models' projections (N output
# features, K input features; K a multiple of 128), each with M from 1 to 16384 (powers of two and odd
# values), capped at about 1.1 TFLOP a call so the whole grid times in a few device minutes. Spans the
# memory-bound small M, the wave-quantized middle and the compute-bound large M.
BROAD_NK = {
    "llama3-8b qkv": (6144, 4096), "llama3-8b down": (4096, 14336),
    "llama3-70b o": (8192, 8192), "llama3-70b gate_up": (57344, 8192),
    "llama3-405b qkv": (18432, 16384), "llama3-405b down": (16384, 53248),
    "qwen2.5-7b qkv": (4608, 3584), "qwen2.5-7b down": (3584, 18944),
    "mixtral expert w1": (14336, 4096), "deepseek-v2 dense up": (12288, 5120),
    "deepseek-v3 dense down": (7168, 18432), "vocab head 128k": (128256, 4096),
}
BROAD_M = [1, 7, 64, 129, 1000, 4096, 16384]
GEMM_BROAD = [(m, n, k) for n, k in BROAD_NK.values() for m in BROAD_M if 2 * m * n * k <= 1.2e12]
