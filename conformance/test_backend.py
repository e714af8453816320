"""Backend choice (dskernels.backend.SUPPORT) on every GPU generation, faked: what "auto" picks and what
an explicit backend says where it cannot run; and `python -m dskernels` as a user first meets it."""
import subprocess
import sys

import pytest
import torch

from dskernels import backend

FP8_OPS = ["per_token_group_quant", "per_token_group_quant_transposed", "per_token_group_quant_both", "per_block_quant", "dequant", "fp8_gemm"]
# (capability, what "auto" picks for: the FP8 ops, mla_decode, the FP8-cache decode, get_mla_metadata,
# append_to_cache, the FP8-cache append, the FP8 grouped GEMMs, the BF16 grouped GEMMs, the FP8 MoE steps)
GENERATIONS = [
    ((8, 0), "reference", "triton", "reference", "reference", "triton", "reference", "reference", "triton",
     "reference"),  # A100
    ((8, 6), "reference", "triton", "reference", "reference", "triton", "reference", "reference", "triton",
     "reference"),  # RTX 30xx
    ((8, 9), "triton", "triton", "triton", "reference", "triton", "triton", "triton", "triton", "triton"),  # L4
    ((9, 0), "cuda", "cuda", "triton", "cuda", "triton", "triton", "cuda", "triton", "triton"),  # H100, H200
    ((10, 0), "triton", "triton", "triton", "reference", "triton", "triton", "triton", "triton", "triton"),  # B200
    ((12, 0), "triton", "triton", "triton", "reference", "triton", "triton", "triton", "triton", "triton"),  # RTX 50
]


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of the given capability, with the extension and Triton importable."""
    def make(cap):
        monkeypatch.setattr(backend, "_RESOLVED", {})  # choices cached for the real GPU do not apply
        monkeypatch.setattr(backend, "capability", lambda device: cap)
        monkeypatch.setattr(backend, "_C", backend._C or object())
        monkeypatch.setattr(backend, "_TRITON_ERROR", None)
        return torch.device("cuda", 0)
    return make


@pytest.mark.parametrize("gen", GENERATIONS, ids=lambda g: f"sm_{g[0][0]}{g[0][1]}")
def test_auto_picks_what_runs_on_each_generation(fake_gpu, gen):
    cap, fp8, mla, mla_fp8, metadata, append, append_fp8, grouped_fp8, grouped_bf16, moe_fp8 = gen
    device = fake_gpu(cap)
    picks = {op: backend.resolve(op, "auto", device) for op in backend.SUPPORT}
    want = {**{op: fp8 for op in FP8_OPS}, "mla_decode": mla, "mla_decode_fp8_cache": mla_fp8,
            "get_mla_metadata": metadata, "append_to_cache": append, "append_to_cache_fp8_cache": append_fp8,
            "m_grouped_fp8_gemm": grouped_fp8, "m_grouped_bf16_gemm": grouped_bf16,
            "k_grouped_fp8_gemm": grouped_fp8,
            "k_grouped_bf16_gemm": grouped_bf16,
            "moe_route": grouped_bf16, "moe_layout": grouped_bf16, "moe_permute": grouped_bf16,
            "moe_permute_fp8": moe_fp8, "moe_combine": grouped_bf16, "moe_swiglu": grouped_bf16,
            "moe_swiglu_fp8": moe_fp8}  # (the MoE steps: Triton's ranges)
    assert picks == want


@pytest.mark.parametrize("cap", [(8, 0), (10, 0), (12, 0)], ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_explicit_cuda_off_hopper_raises_naming_the_rule(fake_gpu, cap):
    device = fake_gpu(cap)
    with pytest.raises(ValueError, match=rf"backend='cuda' cannot run fp8_gemm here: its cuda kernels need compute "
                                         rf"capability 9.x; this GPU has {cap[0]}.{cap[1]}"):
        backend.resolve("fp8_gemm", "cuda", device)


def test_explicit_triton_fp8_on_ampere_raises_naming_the_rule(fake_gpu):
    device = fake_gpu((8, 0))
    with pytest.raises(ValueError, match="need compute capability 8.9 or newer; this GPU has 8.0"):
        backend.resolve("per_block_quant", "triton", device)
    assert backend.resolve("mla_decode", "triton", device) == "triton"


def test_an_op_without_the_backend_raises_instead_of_falling_back(fake_gpu):
    device = fake_gpu((9, 0))
    with pytest.raises(ValueError, match="append_to_cache_fp8_cache has no cuda implementation"):
        backend.resolve("append_to_cache_fp8_cache", "cuda", device)


def test_auto_never_picks_the_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.setattr(backend, "TRITON_INTERPRET", True)
    monkeypatch.setattr(backend, "_RESOLVED", {})
    cpu = torch.device("cpu")
    assert all(backend.resolve(op, "auto", cpu) == "reference" for op in backend.SUPPORT)
    if backend._TRITON_ERROR is None:
        assert backend.resolve("fp8_gemm", "triton", cpu) == "triton"


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dskernels", *args], capture_output=True, text=True, env=env)


def test_info_lists_every_op_and_backend():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    for op in backend.SUPPORT:
        assert f"  {op}: auto -> " in res.stdout, res.stdout
    for name in backend.BACKENDS:
        assert f"    {name:9s} " in res.stdout
    if not torch.cuda.is_available():
        assert "no CUDA driver or GPU found" in res.stdout or "reports no GPU" in res.stdout, res.stdout
        assert "driver version is insufficient" not in res.stdout


def test_info_under_the_interpreter_says_auto_never_uses_it():
    import os
    res = run_cli(env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    if backend._TRITON_ERROR is None:
        assert "'auto' never picks the interpreter" in res.stdout, res.stdout


def test_help_exits_0_and_unknown_commands_do_not():
    assert run_cli("--help").returncode == 0
    assert run_cli("bogus").returncode != 0


def test_a_missing_extension_is_explained(monkeypatch):
    """Installed without nvcc: setup.py's record (dskernels/_build_info.py) is what `info` shows, since pip
    hides setup.py's output; without a record, the import error."""
    import types
    record = types.ModuleType("dskernels._build_info")
    record.EXTENSION_NOT_BUILT = "nvcc was not found at install time (put it on PATH or set CUDA_HOME, then reinstall)"
    monkeypatch.setitem(sys.modules, "dskernels._build_info", record)
    assert backend.extension_missing_reason(ImportError("no module")) == \
        "the CUDA extension was not built: nvcc was not found at install time (put it on PATH or set CUDA_HOME, then reinstall)"
    record.EXTENSION_NOT_BUILT = None
    assert backend.extension_missing_reason(ImportError("undefined symbol: x")) == \
        "dskernels._C is not importable (undefined symbol: x)"
