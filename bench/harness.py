"""The benchmark timer, the ceilings, and the result records (DESIGN.md section 4).

Timer: the op is captured once in a CUDA graph; each sample flushes L2 (writes a buffer twice its
size, outside the timed region), then times one graph replay with CUDA events. The median of the
samples is reported. Graph replay removes Python and launch overhead, which would otherwise dominate
the small-M and decode shapes.
"""
import statistics

import torch

L2_FLUSH_BYTES = 256 * 2**20


class Timer:
    def __init__(self, samples: int = 50, warmup: int = 5):
        self.samples, self.warmup = samples, warmup
        self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def __call__(self, fn) -> float:
        """Median GPU time of fn() in microseconds."""
        for _ in range(self.warmup):  # compiles Triton kernels, creates handles: never captured
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        times = []
        for _ in range(self.samples):
            self._flush.add_(1)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)


def measure_ceilings(timer: Timer) -> dict:
    """The same-run ceilings every record is a fraction of: device copy (bytes read + written),
    bf16 cuBLAS at 8192^3, fp8 cuBLAS at 8192^3 (tensor-wise scales)."""
    n = 8192
    src = torch.randn(2**30 // 2, dtype=torch.bfloat16, device="cuda")  # 1 GiB read, 1 GiB written
    dst = torch.empty_like(src)
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    ops = {"copy": lambda: dst.copy_(src), "bf16": lambda: a @ b,
           "fp8": lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)}
    # An idle GPU runs its first milliseconds at low clocks: take the best of two passes.
    best = {name: min(timer(fn), timer(fn)) for name, fn in ops.items()}
    flops = 2 * n**3
    return {"copy_GBps": 2 * src.numel() * 2 / best["copy"] / 1e3,
            "bf16_TFLOPS": flops / best["bf16"] / 1e6, "fp8_TFLOPS": flops / best["fp8"] / 1e6}


def gpu_metadata() -> dict:
    import triton

    import dskernels
    meta = {"gpu": torch.cuda.get_device_name(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "dskernels": dskernels.__version__}
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        meta.update(driver=pynvml.nvmlSystemGetDriverVersion(),
                    sm_clock_MHz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                    max_sm_clock_MHz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                    mem_clock_MHz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                    power_limit_W=pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000)
    except Exception as e:  # NVML missing: the record still says which GPU it was
        meta["nvml_error"] = f"{type(e).__name__}: {e}"
    return meta


def gpu_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def make_record(*, op, backend, shape, time_us, flops=0, bytes_moved=0, ceilings, bound,
                peer=None, peer_us=None, extra=None) -> dict:
    """One result: time, TFLOPS and GB/s, the fraction of the ceiling that bounds this op
    (bound: "copy_GBps", "bf16_TFLOPS", "fp8_TFLOPS", or "roofline": max(bytes / copy, FLOPs / bf16)
    as a time), and the speedup over the peer measured
    in the same run (peer time / our time). extra: further fields (second peers, anchor lines)."""
    tflops = flops / time_us / 1e6
    gbps = bytes_moved / time_us / 1e3
    if bound == "roofline":  # the slower of moving the bytes and doing the bf16 math
        floor_us = max(bytes_moved / ceilings["copy_GBps"] / 1e3, flops / ceilings["bf16_TFLOPS"] / 1e6)
        fraction = floor_us / time_us
    else:
        fraction = (gbps if bound == "copy_GBps" else tflops) / ceilings[bound]
    rec = {"op": op, "backend": backend, "shape": shape, "time_us": round(time_us, 3),
           "TFLOPS": round(tflops, 2), "GBps": round(gbps, 1), "bound": bound,
           "fraction_of_ceiling": round(fraction, 4)}
    if peer is not None:
        rec.update(peer=peer, peer_us=round(peer_us, 3), speedup_vs_peer=round(peer_us / time_us, 3))
    rec.update(extra or {})
    return rec


def anchors(gpu_name: str) -> dict:
    """The anchors' figures measured on this workplace's GPUs (bench/anchors.json): reference lines
    from another run, never a same-run ratio."""
    import json
    from pathlib import Path
    data = json.loads((Path(__file__).parent / "anchors.json").read_text())
    return data.get(gpu_name, {})
