"""Builds dskernels._C from csrc/ with nvcc + pybind11 when nvcc is found.

No PyTorch headers are involved, so the build takes seconds per file and the module works with any
torch version. Without nvcc, or with DSKERNELS_NO_CUDA=1, the pure-Python package is installed
(Triton and reference backends) and dskernels/_build_info.py records why, for `python -m dskernels
info`. When nvcc is found, a compile error fails the install: CI relies on that as its compile check
(and sets DSKERNELS_REQUIRE_CUDA=1 so a missing nvcc fails too).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# wgmma, setmaxnreg, TMA: every kernel is built for Hopper alone (dskernels.backend.SUPPORT says so too).
GENCODE = ["-gencode=arch=compute_90a,code=sm_90a"]


def find_nvcc():
    if os.environ.get("DSKERNELS_NO_CUDA") == "1":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class NvccBuild(build_ext):
    """Compiles every .cu source with nvcc (in parallel), then links them with nvcc."""

    def build_extension(self, ext):
        import pybind11

        nvcc = find_nvcc()
        out = Path(self.get_ext_fullpath(ext.name))
        tmp = Path(self.build_temp) / "csrc"
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fPIC",
                 "-Xptxas=-warn-spills", *GENCODE,
                 f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
        objects = []

        def compile_one(src):
            obj = tmp / (Path(src).as_posix().replace("/", "_") + ".o")
            cmd = [nvcc, *flags, "-c", str(ROOT / src), "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{res.stdout}{res.stderr}")
            return obj

        jobs = int(os.environ.get("DSKERNELS_BUILD_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        link = [nvcc, "-shared", *GENCODE, "-o", str(out), *map(str, objects)]
        print(" ".join(link), flush=True)
        subprocess.run(link, check=True)


def record_build(not_built):
    """dskernels/_build_info.py tells `python -m dskernels info` why the extension is missing (pip hides
    this script's output)."""
    text = ('"""Written by setup.py at install time."""\n'
            f"EXTENSION_NOT_BUILT = {not_built!r}  # None: dskernels._C was built\n")
    (ROOT / "dskernels" / "_build_info.py").write_text(text)


ext_modules, cmdclass = [], {}
if find_nvcc():
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.cu")
                     if not p.name.endswith("_selftest.cu"))
    ext_modules = [Extension("dskernels._C", sources)]
    cmdclass = {"build_ext": NvccBuild}
    record_build(None)
elif os.environ.get("DSKERNELS_REQUIRE_CUDA") == "1":
    sys.exit("dskernels: DSKERNELS_REQUIRE_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
else:
    why = ("DSKERNELS_NO_CUDA=1 was set at install time" if os.environ.get("DSKERNELS_NO_CUDA") == "1" else
           "nvcc was not found at install time (put it on PATH or set CUDA_HOME, then reinstall)")
    record_build(why)
    print(f"dskernels: installing without the CUDA extension: {why}", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
