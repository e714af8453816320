"""Which implementation runs an op: "reference" (plain PyTorch), "triton" or "cuda" (dskernels._C).

"auto" picks CUDA on a GPU that meets the op's compute capability when the extension is built, else
Triton on a GPU, else the reference. `python -m dskernels info` prints what is available and why not.
Also here: the bridge from foreign arrays (CuPy, JAX: DLPack or __cuda_array_interface__) to torch,
the integer stream handle the extension takes, and the output allocator (poisoned under test).
"""
import contextlib
import functools
import os

import torch

BACKENDS = ("reference", "triton", "cuda")

try:
    import dskernels._C as _C
    _C_ERROR = None
except ImportError as e:  # built without nvcc, or a broken build: say which in `info`
    _C, _C_ERROR = None, f"dskernels._C not importable ({e})"

try:
    import triton  # noqa: F401
    _TRITON_ERROR = None
except ImportError as e:
    _TRITON_ERROR = f"triton not importable ({e})"

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def device_properties(index: int):
    """The extension's view of a GPU (name, capability, SM count), cached per device index."""
    with torch.cuda.device(index):
        return _C.device_info()


def why_unavailable(backend: str, device: torch.device, min_capability=(9, 0), implemented=BACKENDS):
    """None when `backend` can run an op on `device`, else the reason in a sentence."""
    if backend in BACKENDS and backend not in implemented:
        return f"this op has no {backend} implementation yet (it has {', '.join(implemented)})"
    if backend == "reference":
        return None
    if backend == "triton":
        if _TRITON_ERROR:
            return _TRITON_ERROR
        if device.type == "cuda" or TRITON_INTERPRET:
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    if backend == "cuda":
        if _C is None:
            return _C_ERROR
        if device.type != "cuda":
            return "tensors are not on a CUDA device"
        cap = torch.cuda.get_device_capability(device)
        if cap < tuple(min_capability):
            return f"needs compute capability {min_capability[0]}.{min_capability[1]}, GPU has {cap[0]}.{cap[1]}"
        return None
    return f"unknown backend {backend!r}; choose from {BACKENDS + ('auto',)}"


def resolve(backend: str, device: torch.device, min_capability=(9, 0), implemented=BACKENDS,
            auto_order=("cuda", "triton")) -> str:
    """The backend that will run: `backend` itself if it can, else for "auto" the first of
    auto_order that can, else the reference."""
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        for name in auto_order:
            if why_unavailable(name, device, min_capability, implemented) is None:
                return name
        return "reference"
    reason = why_unavailable(backend, device, min_capability, implemented)
    if reason:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend


def as_tensor(name: str, x) -> torch.Tensor:
    """torch tensors pass through; CuPy/JAX/NumPy arrays are wrapped without a copy."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    if hasattr(x, "__cuda_array_interface__"):
        return torch.as_tensor(x, device="cuda")
    raise TypeError(f"{name} must be a torch.Tensor or an array with __dlpack__ or "
                    f"__cuda_array_interface__, got {type(x).__name__}")


def on_device(t: torch.Tensor):
    """Make t's GPU current for a launch (the extension launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as the integer handle the extension takes."""
    return torch.cuda.current_stream(t.device).cuda_stream


_POISON = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Under this context, outputs that ops allocate are filled with NaN (0xFF bytes) first, so a
    kernel that leaves an element unwritten fails its conformance test instead of passing by luck."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def empty(shape, dtype, device, strides=None) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device) if strides is None else \
        torch.empty_strided(shape, strides, dtype=dtype, device=device)
    if _POISON and t.numel():
        t.view(torch.uint8).fill_(0xFF) if t.is_contiguous() else t.fill_(float("nan"))
    return t
