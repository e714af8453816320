"""One small call of each CUDA grouped GEMM layout, checked against the reference backend: the process
ci/gpu.sh's sanitize phase runs under compute-sanitizer (memcheck, racecheck) for the grouped kernels,
which the dense self-test does not launch. Contiguous with padding rows, an empty expert and a partial
tile; masked with an empty expert, a partial and a full one, its scales in both MN-major layouts (one
array over all rows: the 2D tensor map; row-major, copied per expert: the 3D map); k-grouped with an
empty group. Exits 1 on a wrong result."""
import sys

import torch

import dskernels

torch.manual_seed(0)
K, N, G = 512, 256, 3
w = torch.randn(G, N, K, dtype=torch.bfloat16, device="cuda")
qs = [dskernels.per_block_quant(w[g]) for g in range(G)]
b, sb = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
ids = []
for e, n in enumerate([100, 0, 300]):
    ids += [e] * n + [-1] * ((-n) % 128)
m_indices = torch.tensor(ids, dtype=torch.int32, device="cuda")
x = torch.randn(len(ids), K, dtype=torch.bfloat16, device="cuda")
a, sa = dskernels.per_token_group_quant(x, scale_layout="col")
failed = []


def check(name, got, want, bound):
    err, scale = (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()
    print(f"{name}: max |err| {err:.3g} of max |out| {scale:.3g}", flush=True)
    if not err <= bound * scale:
        failed.append(name)


both = [dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend=be) for be in ("cuda", "reference")]
check("contiguous", *(o[m_indices != -1] for o in both), 2 ** -7)
masked = [5, 0, 128]
mm = torch.tensor(masked, dtype=torch.int32, device="cuda")
a3 = a[:384].view(G, 128, K)
for layout, s3 in (("flat", sa[:384].view(G, 128, K // 128)),
                   ("row-major", sa[:384].contiguous().view(G, 128, K // 128))):
    both = [dskernels.m_grouped_fp8_gemm_nt_masked(a3, s3, b, sb, mm, 64, backend=be) for be in ("cuda", "reference")]
    check(f"masked ({layout} scales)", *(torch.cat([o[g, :n] for g, n in enumerate(masked)]) for o in both), 2 ** -7)
T = 512
qa, qsa = dskernels.per_token_group_quant_transposed(torch.randn(T, 256, dtype=torch.bfloat16, device="cuda"),
                                                     scale_layout="col")
qb, qsb = dskernels.per_token_group_quant_transposed(torch.randn(T, 384, dtype=torch.bfloat16, device="cuda"),
                                                     scale_layout="col")
off = torch.tensor([0, 128, 128, 512], dtype=torch.int32, device="cuda")
both = [dskernels.k_grouped_fp8_gemm_nt_contiguous(qa, qsa, qb, qsb, off, torch.zeros(3, 256, 384, device="cuda"),
                                                   backend=be) for be in ("cuda", "reference")]
check("k-grouped", *both, 1e-3)
torch.cuda.synchronize()
sys.exit(1 if failed else 0)
