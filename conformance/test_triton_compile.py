"""Every Triton kernel compiles on this machine, GPU or not, for each GPU generation the Triton
backend runs on (dskernels.backend.SUPPORT: Ada sm_89, Hopper sm_90, Blackwell sm_100), and on Hopper
the matrix products lower to wgmma. The interpreter that runs the kernels on a CPU accepts code the
compiler rejects (a non-constexpr global, say), so this is CI's only view of the compiled path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module", params=[89, 90, 100], ids=lambda c: f"sm_{c}")
def compiled(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "conformance.triton_compile", str(request.param)],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=1200)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows, f"the compile script printed nothing:\n{res.stderr[-3000:]}"
    return request.param, {r["kernel"]: r for r in rows}


def test_every_triton_kernel_compiles(compiled):
    _, kernels = compiled
    failed = {k: r["error"] for k, r in kernels.items() if not r["ok"]}
    assert not failed, "\n\n".join(f"{k}:\n{e}" for k, e in failed.items())


def test_hopper_matrix_products_lower_to_wgmma(compiled):
    capability, kernels = compiled
    if capability != 90:
        pytest.skip("wgmma is Hopper's")
    gemms = {k: r for k, r in kernels.items() if k.startswith(("fp8_gemm", "bf16_gemm"))}
    assert gemms and all(r["wgmma"] > 0 for r in gemms.values()), {k: r["wgmma"] for k, r in gemms.items()}
    assert kernels["mla_split(BLOCK_H=64)"]["wgmma"] > 0
