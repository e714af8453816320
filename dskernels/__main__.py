"""`python -m dskernels info`: the GPU, its compute capability, and which backends run here (and why
not). `python -m dskernels` alone prints the same."""
import sys

import torch

from dskernels import backend


def gpu_lines():
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # no driver, or nvidia-ml-py missing
        return [f"GPU: none visible through NVML ({type(e).__name__}: {e})"]
    lines = [f"driver {pynvml.nvmlSystemGetDriverVersion()}"]
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        clock = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        lines.append(f"GPU {i}: {pynvml.nvmlDeviceGetName(h)}, compute capability {major}.{minor}, "
                     f"{mem:.0f} GiB, max SM clock {clock} MHz")
    return lines


def info() -> str:
    out = [f"dskernels {__import__('dskernels').__version__}, torch {torch.__version__}"]
    out += gpu_lines()
    if backend._C is not None:
        try:
            p = backend._C.device_info()
            out.append(f"extension: built, sees {p['name']} (sm_{p['capability'][0]}{p['capability'][1]}, "
                       f"{p['sms']} SMs)")
        except RuntimeError as e:
            out.append(f"extension: built; no usable GPU ({e})")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out.append(f"backends for tensors on {device}:")
    for name, cap in (("reference", None), ("triton", None), ("cuda", (9, 0))):
        reason = backend.why_unavailable(name, device, cap or (9, 0))
        out.append(f"  {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    out.append(f"  auto       -> {backend.resolve('auto', device)}")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["info"]):
        sys.exit("usage: python -m dskernels [info]")
    print(info())
