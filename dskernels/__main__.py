"""`python -m dskernels info`: the GPU, the extension, and for every op which backend "auto" picks here
and why each other one cannot run (dskernels.backend.SUPPORT). `python -m dskernels` alone prints the
same."""
import argparse

import torch

from dskernels import backend


def gpu_lines():
    if not torch.cuda.is_available():
        return [f"GPU: {backend.no_gpu_reason()}"]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                     f"{p.multi_processor_count} SMs")
    try:
        import pynvml
        pynvml.nvmlInit()
        lines.append(f"driver {pynvml.nvmlSystemGetDriverVersion()}")
    except Exception as e:  # nvidia-ml-py missing: the driver version is only a detail
        lines.append(f"driver version unknown (nvidia-ml-py: {type(e).__name__})")
    return lines


def extension_line():
    if backend._C is None:
        return f"extension: not available: {backend._C_ERROR}"
    if not torch.cuda.is_available():
        return f"extension: built (sm_90a kernels); {backend.no_gpu_reason()}"
    p = backend._C.device_info()
    return f"extension: built (sm_90a kernels), sees {p['name']} (sm_{p['capability'][0]}{p['capability'][1]})"


def triton_line():
    if backend._TRITON_ERROR:
        return f"triton: {backend._TRITON_ERROR}"
    import triton
    line = f"triton: {triton.__version__}"
    if backend.TRITON_INTERPRET:
        line += (" under TRITON_INTERPRET=1: backend='triton' runs the kernels on the CPU through the interpreter "
                 "(slow, for tests); 'auto' never picks the interpreter")
    return line


def info() -> str:
    out = [f"dskernels {__import__('dskernels').__version__}, torch {torch.__version__}"]
    out += gpu_lines() + [extension_line(), triton_line()]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out.append(f"ops on tensors on {device}: the backend 'auto' picks, and why the others cannot run")
    for op in backend.SUPPORT:
        out.append(f"  {op}: auto -> {backend.resolve(op, 'auto', device)}")
        for name in backend.BACKENDS:
            reason = backend.why_unavailable(op, name, device)
            out.append(f"    {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dskernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="info", choices=["info"],
                        help="info (the default): GPU, extension and backends per op")
    parser.parse_args(argv)
    print(info())


if __name__ == "__main__":
    main()
