"""Every Triton kernel compiles for Hopper (sm_90a) on this machine, GPU or not, and the matrix
products lower to wgmma. The interpreter that runs the kernels on a CPU accepts code the compiler
rejects (a non-constexpr global, say), so this is CI's only view of the compiled path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "conformance.triton_hopper_compile"], capture_output=True,
                         text=True, env=env, cwd=Path(__file__).parent.parent, timeout=1200)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows, f"the compile script printed nothing:\n{res.stderr[-3000:]}"
    return {r["kernel"]: r for r in rows}


def test_every_triton_kernel_compiles_for_sm90a(compiled):
    failed = {k: r["error"] for k, r in compiled.items() if not r["ok"]}
    assert not failed, "\n\n".join(f"{k}:\n{e}" for k, e in failed.items())


def test_fp8_gemm_lowers_to_wgmma(compiled):
    gemms = {k: r for k, r in compiled.items() if k.startswith("fp8_gemm")}
    assert gemms and all(r["wgmma"] > 0 for r in gemms.values()), {k: r["wgmma"] for k, r in gemms.items()}


def test_mla_split_with_64_rows_lowers_to_wgmma(compiled):
    assert compiled["mla_split(BLOCK_H=64)"]["wgmma"] > 0
