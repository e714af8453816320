"""The CUDA extension as built: the FP8 GEMM's SASS runs on the tensor cores' FP8 path (QGMMA),
and no kernel keeps registers in local memory (spills). Read with cuobjdump, from the CUDA toolkit or
the one the triton package carries; no GPU needed."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dskernels import backend


def cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


@pytest.fixture(scope="module")
def extension():
    if backend._C is None:
        pytest.skip(f"the CUDA extension is not built: {backend._C_ERROR}")
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton package)")
    return tool, backend._C.__file__


def test_fp8_gemm_sass_uses_fp8_wgmma(extension):
    tool, so = extension
    sass = subprocess.run([tool, "-sass", so], capture_output=True, text=True, check=True).stdout
    assert "QGMMA.64x" in sass and "E4M3.E4M3" in sass, "the FP8 GEMM must issue QGMMA (fp8 wgmma)"


def test_no_kernel_spills_to_local_memory(extension):
    tool, so = extension
    usage = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=True).stdout
    spilling = re.findall(r"Function (\S+):\n\s+REG:\d+ STACK:(\d+) .*LOCAL:(\d+)", usage)
    bad = [name for name, stack, local in spilling if int(local) > 0]
    assert spilling and not bad, f"kernels with local memory: {bad}"
