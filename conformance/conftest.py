"""Fixtures shared by the conformance suites: the device, the backends that can run here, fresh
random inputs with outliers, poisoned outputs, and deterministic seeds.

On a CPU machine the reference always runs, and the Triton kernels run when TRITON_INTERPRET=1 is
set (as .ci/run does); on a GPU every available backend runs on the GPU.
"""
import zlib

import pytest
import torch

import dskernels
from dskernels import backend as _backend
from dskernels.reference import gemm as _ref_gemm

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

# Two fills for every output and workspace an op allocates (dskernels.poison_outputs): 0xFF is NaN in
# every float type and -1 in every integer type; 0x5A is a large finite float, a plausible e4m3 value
# (20.0) and a large integer. A checked call runs under both and must give identical bits: an element
# that a kernel never writes differs between the two runs, whatever values the op can produce.
POISONS = (0xFF, 0x5A)


def backends_for(op):
    """pytest params: every backend, skipped with its reason where it cannot run `op` here."""
    params = []
    for name in _backend.BACKENDS:
        reason = _backend.why_unavailable(op, name, DEVICE)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


def available(params):
    """The backend names among backends_for's params that run here."""
    return [p.values[0] for p in params if not p.marks[0].args[0]]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every output an op allocates starts as NaN bytes: an element a kernel forgets stays NaN."""
    with dskernels.poison_outputs(POISONS[0]):
        yield


def _flatten(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _flatten(r)]
    return [result]


def as_bytes(t):
    """t's elements as bytes, in row-major order (copied into a fresh buffer: any strides, size-1 dims too)."""
    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device).copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8).cpu()


def twice_poisoned(fn):
    """fn() under each poison in POISONS; the results (tensors, or tuples of them and plain values)
    must be identical bit for bit. Returns the first."""
    results = []
    for byte in POISONS:
        with dskernels.poison_outputs(byte):
            results.append(fn())
    first, second = _flatten(results[0]), _flatten(results[1])
    assert len(first) == len(second)
    for i, (x, y) in enumerate(zip(first, second)):
        if isinstance(x, torch.Tensor):
            same = x.shape == y.shape and torch.equal(as_bytes(x), as_bytes(y))
            if not same:
                diff = (as_bytes(x) != as_bytes(y)).sum().item()
                raise AssertionError(f"output {i} depends on the poison: {diff} bytes differ between runs with "
                                     f"fill bytes {POISONS[0]:#x} and {POISONS[1]:#x} (elements left unwritten)")
        else:
            assert x == y, f"output {i}: {x!r} != {y!r}"
    return results[0]


def seed_of(*parts) -> int:
    """A seed from a test's parameters that is the same in every process (unlike hash() of a str)."""
    return zlib.crc32(repr(parts).encode())


def random_input(shape, dtype=torch.bfloat16, seed=0, device=DEVICE, outliers=True):
    """Normal values whose magnitude varies by up to 10**+-2 from row to row, with rare outliers
    (x30) when asked: fresh data on every call (seeded), never zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = shape[0] if len(shape) > 1 else 1
    x *= 10.0 ** (torch.rand(rows, 1, generator=g, dtype=torch.float64) * 4 - 2).view(
        (rows,) + (1,) * (len(shape) - 1))
    if outliers:
        spikes = torch.rand(shape, generator=g) < 1e-3
        x[spikes] *= 30
    return x.to(dtype).to(device)


def accumulation(backend):
    """Where the backend sums a K block (conformance/tolerances.py): IEEE fp32, or the tensor cores."""
    if backend == "reference" or (backend == "triton" and _backend.TRITON_INTERPRET and not ON_GPU):
        return "ieee"
    return "tensor_core"


def exact_gemm(a, sa, b, sb, base=None):
    """The promoted sum in float64 and the same sum over |a|, |b| (plus the base added into)."""
    want = _ref_gemm.fp8_gemm(a, sa, b, sb, torch.float64, accumulate_dtype=torch.float64)
    magnitude = _ref_gemm.fp8_gemm(a.float().abs().to(a.dtype), sa, b.float().abs().to(b.dtype), sb, torch.float64,
                                   accumulate_dtype=torch.float64)
    if base is not None:
        want, magnitude = want + base.double(), magnitude + base.double().abs()
    return want, magnitude
