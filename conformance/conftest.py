"""Fixtures shared by the conformance suites: the device, the backends that can run here, fresh
random inputs with outliers, and poisoned outputs.

On a CPU machine the reference always runs, and the Triton kernels run when TRITON_INTERPRET=1 is
set (as .ci/run does); on a GPU every available backend runs on the GPU.
"""
import pytest
import torch

import dskernels
from dskernels import backend as _backend

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def backends_for(min_capability):
    """pytest params: every backend, skipped with its reason where it cannot run here."""
    params = []
    for name in _backend.BACKENDS:
        reason = _backend.why_unavailable(name, DEVICE, min_capability)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every output an op allocates starts as NaN bytes: an element a kernel forgets stays NaN."""
    with dskernels.poison_outputs():
        yield


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
