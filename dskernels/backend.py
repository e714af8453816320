"""Which implementation runs an op: "reference" (plain PyTorch), "triton" or "cuda" (dskernels._C).

SUPPORT says, per op, the GPUs (compute capabilities) each backend's kernels run on; the reference runs
everywhere. `resolve` follows it: an explicit backend runs or raises, naming why it cannot; "auto" takes
CUDA where it runs, else Triton on a GPU, else the reference, and never Triton's CPU interpreter.
`python -m dskernels info` prints the same table for this machine. Also here: the bridge from foreign
arrays (CuPy, JAX: DLPack or __cuda_array_interface__) to torch, the integer stream handle the
extension takes, and the output allocator (poisoned under test).
"""
import contextlib
import ctypes
import functools
import os

import torch
import torch.optim.optimizer as _optim

BACKENDS = ("reference", "triton", "cuda")


def extension_missing_reason(error: ImportError) -> str:
    """Why dskernels._C is missing: setup.py's record when it skipped the build (pip hides its output),
    else the import error of a broken build."""
    try:
        from dskernels._build_info import EXTENSION_NOT_BUILT
    except ImportError:
        EXTENSION_NOT_BUILT = None
    if EXTENSION_NOT_BUILT:
        return f"the CUDA extension was not built: {EXTENSION_NOT_BUILT}"
    return f"dskernels._C is not importable ({error})"


try:
    import dskernels._C as _C
    _C_ERROR = None
except ImportError as e:  # built without nvcc, or a broken build: `info` says which
    _C, _C_ERROR = None, extension_missing_reason(e)

try:
    import triton  # noqa: F401
    _TRITON_ERROR = None
except ImportError as e:
    _TRITON_ERROR = f"triton is not importable ({e})"

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Compute-capability ranges (lowest, highest), inclusive; None: no upper limit.
SM90 = ((9, 0), (9, 9))   # the CUDA kernels: compiled for sm_90a (wgmma, TMA) and nothing else
FP8 = ((8, 9), None)      # Triton kernels on e4m3 tensors: FP8 conversions and tensor cores from Ada on
BF16 = ((8, 0), None)     # Triton kernels on bf16/fp32 tensors only

SUPPORT = {  # op -> {backend: capability range}; a backend not listed has no implementation of the op
    "per_token_group_quant": {"cuda": SM90, "triton": FP8},
    "per_token_group_quant_transposed": {"cuda": SM90, "triton": FP8},
    "per_token_group_quant_both": {"cuda": SM90, "triton": FP8},
    "per_block_quant": {"cuda": SM90, "triton": FP8},
    "dequant": {"cuda": SM90, "triton": FP8},
    "fp8_gemm": {"cuda": SM90, "triton": FP8},
    "m_grouped_fp8_gemm": {"cuda": SM90, "triton": FP8},
    "m_grouped_bf16_gemm": {"triton": BF16},
    "k_grouped_fp8_gemm": {"cuda": SM90, "triton": FP8},
    "k_grouped_bf16_gemm": {"triton": BF16},
    "mla_decode": {"cuda": SM90, "triton": BF16},
    "mla_decode_fp8_cache": {"triton": FP8},
    "get_mla_metadata": {"cuda": SM90},
    "append_to_cache": {"triton": BF16},
    "append_to_cache_fp8_cache": {"triton": FP8},
    "moe_route": {"triton": BF16},
    "moe_layout": {"triton": BF16},
    "moe_permute": {"triton": BF16},
    "moe_permute_fp8": {"triton": FP8},
    "moe_combine": {"triton": BF16},
    "moe_swiglu": {"triton": BF16},
    "moe_swiglu_fp8": {"triton": FP8},
}


@functools.lru_cache(maxsize=None)
def device_properties(index: int):
    """The extension's view of a GPU (name, capability, SM count), cached per device index."""
    with torch.cuda.device(index):
        return _C.device_info()


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA device (cached per device index)."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def _in_range(cap, rng) -> bool:
    low, high = rng
    return cap >= low and (high is None or cap <= high)


def _range_text(rng) -> str:
    low, high = rng
    if high is None:
        return f"compute capability {low[0]}.{low[1]} or newer"
    if low[0] == high[0] and high[1] == 9:
        return f"compute capability {low[0]}.x"
    return f"compute capability {low[0]}.{low[1]} to {high[0]}.{high[1]}"


def why_unavailable(op: str, backend: str, device: torch.device):
    """None when `backend` can run `op` on tensors on `device`, else the reason in a sentence."""
    if not isinstance(backend, str):
        return f"backend must be a str, one of {BACKENDS + ('auto',)}; got {type(backend).__name__}"
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose from {BACKENDS + ('auto',)}"
    if backend == "reference":
        return None
    support = SUPPORT[op]
    if backend not in support:
        have = ", ".join(["reference", *support])
        return f"{op} has no {backend} implementation (it has {have})"
    if backend == "triton":
        if _TRITON_ERROR:
            return _TRITON_ERROR
        if device.type != "cuda":
            return None if TRITON_INTERPRET else "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    else:
        if _C is None:
            return _C_ERROR
        if device.type != "cuda":
            return "tensors are not on a CUDA device"
    cap = capability(device)
    if not _in_range(cap, support[backend]):
        return f"its {backend} kernels need {_range_text(support[backend])}; this GPU has {cap[0]}.{cap[1]}"
    return None


_RESOLVED = {}  # (op, backend, device) -> backend name: the choice is fixed per process and device


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that will run `op`: `backend` itself if it can (else ValueError naming why), or for
    "auto" CUDA, then Triton on a GPU, then the reference. Cached per (op, backend, device)."""
    key = (op, backend, device)
    try:
        return _RESOLVED[key]
    except (KeyError, TypeError):  # TypeError: an unhashable backend, which the check below names
        pass
    if backend == "auto":
        name = "reference"  # never the interpreter for CPU tensors
        if device.type == "cuda":
            name = next((n for n in ("cuda", "triton") if why_unavailable(op, n, device) is None), "reference")
    else:
        reason = why_unavailable(op, backend, device)
        if reason:
            raise (TypeError if not isinstance(backend, str) else ValueError)(
                f"backend={backend!r} cannot run {op} here: {reason}")
        name = backend
    _RESOLVED[key] = name
    return name


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors) -> bool:
    """Whether an op may run its implementation directly rather than through its torch.library custom op:
    plain tensors, and no torch.compile/export tracing, TorchDispatchMode (fake tensors, functionalization,
    make_fx), functorch transform or torch.jit.trace active. The custom op is there for those; in plain eager mode the
    dispatcher's round trip through Python would cost more host time than most kernels run."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state() is not None:
        return False  # (the last: torch.jit.trace, which records only dispatcher calls)
    for t in tensors:
        if type(t) not in _PLAIN:
            return False
    return True


def signature(*tensors) -> tuple:
    """The part of a call's arguments a cached plan depends on: each tensor's shape, strides, dtype and
    device (None stays None). The ops' plan caches key on it with their options."""
    return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors)


def pick(impl, custom_op, *tensors):
    """impl in plain eager mode (eager(*tensors)), else the custom op that wraps it."""
    return impl if eager(*tensors) else custom_op


def no_gpu_reason() -> str:
    """Why torch sees no usable GPU, in words a user can act on."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver or GPU found"
    if torch.cuda.device_count() == 0:
        return "the CUDA driver is installed but reports no GPU"
    return "torch cannot use the GPU (torch.cuda.is_available() is False)"


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
    """Make t's GPU current for a launch (the extension launches on the current device); a no-op context
    when it already is (the common case: no device switch, no host cost)."""
    device = t.device
    if device.type != "cuda" or device.index == torch._C._cuda_getDevice():  # (a CUDA tensor: CUDA is up)
        return _SAME_DEVICE
    return torch.cuda.device(device)


_SAME_DEVICE = contextlib.nullcontext()  # reusable


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as the integer handle the extension takes."""
    return torch._C._cuda_getCurrentRawStream(t.device.index)


_POISON = None


@contextlib.contextmanager
def poison_outputs(byte: int | None = 0xFF):
    """Under this context every output and workspace an op allocates is first filled with `byte`
    (0xFF: NaN in every float type), so a kernel that leaves an element unwritten fails its test
    instead of passing by luck. Tests run a call under two bytes and require identical results:
    no single byte is safe, since FP8 and bf16 outputs can take every bit pattern."""
    global _POISON
    old, _POISON = _POISON, byte
    try:
        yield
    finally:
        _POISON = old


def empty(shape, dtype, device, strides=None) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device) if strides is None else \
        torch.empty_strided(shape, strides, dtype=dtype, device=device)
    if _POISON is not None and t.numel():
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # the whole storage, padding too
        t.as_strided((span,), (1,)).view(torch.uint8).fill_(_POISON)
    return t


# Every torch.optim optimizer's step() counted, process-wide: the FP8 weight caches (FP8Linear, MoE) key on
# it beside the weight's version counter, which a fused optimizer leaves unchanged when it updates the
# parameters in place (torch's fused AdamW does: its step writes the weight, _version stays).
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs):
    _OPTIMIZER_STEPS[0] += 1


_optim.register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many optimizer steps (any torch.optim optimizer's) this process has taken."""
    return _OPTIMIZER_STEPS[0]
