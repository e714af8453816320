"""The benchmark timer, the ceilings, and the result records (DESIGN.md section 4).

Three times per op, each the median of its samples:
- graph_us: the op captured once in a CUDA graph, one replay timed with CUDA events: the kernels alone,
  without Python or launch overhead (what a CUDA-graph user sees, and what the ceilings compare with).
- eager_us: one eager call between CUDA events, started on an idle GPU (synchronized after the flush),
  so the host's work before the first launch and between launches counts: what a user calling the op
  eagerly sees when the GPU is not already busy.
- host_us: the host time of one call, from calls made back to back without a sync (the GPU queue hides
  the kernels): what each call costs the CPU, the budget that decides whether eager code keeps the GPU fed.
Before each graph and eager sample L2 is flushed by reading a buffer five times its size, outside the
timed region. The flush reads rather than writes: L2 is write-back, so a written flush buffer would leave
up to 50 MB of dirty lines that the timed op then pays to write back (about 17 us of HBM time on an
H100, against a 38 us quantization); a read leaves clean lines, and the previous replay's dirty output
drains during the flush.
"""
import functools
import statistics
import time

import torch

L2_FLUSH_BYTES = 256 * 2**20


class Timer:
    def __init__(self, samples: int = 50, warmup: int = 5, host_calls: int = 20):
        self.samples, self.warmup, self.host_calls = samples, warmup, host_calls
        self._flush = torch.ones(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        self._sink = torch.zeros((), dtype=torch.int64, device="cuda")

    def _flush_l2(self):
        torch.sum(self._flush, dim=0, out=self._sink)

    def _warm(self, fn):
        for _ in range(self.warmup):  # compiles Triton kernels, creates handles, fills caches
            fn()
        torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        """Median CUDA-graph replay time of fn() in microseconds."""
        self._warm(fn)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        return self._events(graph.replay, sync_after_flush=False)

    def eager(self, fn) -> float:
        """Median time of one eager fn() between CUDA events, started on an idle GPU, in microseconds."""
        self._warm(fn)
        return self._events(fn, sync_after_flush=True)

    def host(self, fn) -> float:
        """Host microseconds per fn() call, back to back without a sync (the best of five runs)."""
        self._warm(fn)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(self.host_calls):
                fn()
            best = min(best, (time.perf_counter() - start) / self.host_calls * 1e6)
        torch.cuda.synchronize()
        return best

    def all(self, fn) -> dict:
        return {"graph_us": self(fn), "eager_us": self.eager(fn), "host_us": self.host(fn)}

    def _events(self, run, sync_after_flush):
        times = []
        for _ in range(self.samples):
            self._flush_l2()
            if sync_after_flush:
                torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)


def _triton_copy():
    """A streaming copy in Triton (16-byte accesses, 64 bytes in flight per thread): on an H100,
    torch's copy_ (cudaMemcpyAsync) reached only 2.43 TB/s in the run where our dequantization
    kernel moved 2.55 TB/s, so torch's copy alone is no ceiling."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, cache_modifier=".cg"), cache_modifier=".cs")

    def run(src, dst, block=8192):
        assert src.numel() % block == 0
        copy_kernel[(src.numel() // block,)](src, dst, BLOCK=block, num_warps=8)

    return run


def measure_ceilings(timer: Timer) -> dict:
    """The same-run ceilings every record is a fraction of: device copy (bytes read + written; the
    faster of torch's copy_ and a Triton streaming copy, both recorded), bf16 cuBLAS at 8192^3, fp8
    cuBLAS at 8192^3 (tensor-wise scales)."""
    n = 8192
    src = torch.randn(2**30 // 2, dtype=torch.bfloat16, device="cuda")  # 1 GiB read, 1 GiB written
    dst = torch.empty_like(src)
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    triton_copy = _triton_copy()
    ops = {"copy_torch": lambda: dst.copy_(src), "copy_triton": lambda: triton_copy(src, dst),
           "bf16": lambda: a @ b, "fp8": lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)}
    # An idle GPU runs its first milliseconds at low clocks: take the best of two passes.
    best = {name: min(timer(fn), timer(fn)) for name, fn in ops.items()}
    flops = 2 * n**3
    copy = {name: 2 * src.numel() * 2 / best[name] / 1e3 for name in ("copy_torch", "copy_triton")}
    return {"copy_GBps": max(copy.values()), "copy_torch_GBps": copy["copy_torch"],
            "copy_triton_GBps": copy["copy_triton"],
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


def make_record(*, op, backend, shape, times, flops=0, bytes_moved=0, ceilings, bound, peer=None,
                peer_times=None, headline="graph", extra=None) -> dict:
    """One result. times / peer_times: Timer.all's graph_us, eager_us and host_us of ours and of the peer
    measured in the same run. TFLOPS, GB/s and the fraction of the ceiling that bounds the op (bound:
    "copy_GBps", "bf16_TFLOPS", "fp8_TFLOPS", or "roofline": max(bytes / copy, FLOPs / bf16) as a time)
    are of the kernel time (graph_us). headline ("graph" or "eager": how the op's users call it) picks
    time_us, peer_us and speedup_vs_peer (peer time / ours); both ratios are kept besides.
    extra: further fields (second peers, anchor lines)."""
    graph_us = times["graph_us"]
    tflops = flops / graph_us / 1e6
    gbps = bytes_moved / graph_us / 1e3
    if bound == "roofline":  # the slower of moving the bytes and doing the bf16 math
        floor_us = max(bytes_moved / ceilings["copy_GBps"] / 1e3, flops / ceilings["bf16_TFLOPS"] / 1e6)
        fraction = floor_us / graph_us
    else:
        fraction = (gbps if bound == "copy_GBps" else tflops) / ceilings[bound]
    rec = {"op": op, "backend": backend, "shape": shape, "headline": headline,
           "time_us": round(times[f"{headline}_us"], 3), **{k: round(v, 3) for k, v in times.items()},
           "TFLOPS": round(tflops, 2), "GBps": round(gbps, 1), "bound": bound,
           "fraction_of_ceiling": round(fraction, 4),
           # the same-run ceilings the fraction is of (a results file merges records of several runs)
           "ceilings": {k: round(ceilings[k], 1) for k in ("copy_GBps", "bf16_TFLOPS", "fp8_TFLOPS")}}
    if peer is not None:
        rec.update(peer=peer, peer_us=round(peer_times[f"{headline}_us"], 3),
                   speedup_vs_peer=round(peer_times[f"{headline}_us"] / times[f"{headline}_us"], 3),
                   **{f"peer_{k}": round(v, 3) for k, v in peer_times.items()},
                   graph_speedup_vs_peer=round(peer_times["graph_us"] / times["graph_us"], 3),
                   eager_speedup_vs_peer=round(peer_times["eager_us"] / times["eager_us"], 3))
    rec.update(extra or {})
    return rec


@functools.lru_cache(maxsize=None)
def _anchor_file() -> dict:
    import json
    from pathlib import Path
    return json.loads((Path(__file__).parent / "anchors.json").read_text())


def anchors(gpu_name: str) -> dict:
    """The anchors' figures measured on this workplace's GPUs (bench/anchors.json): reference lines
    from another run, never a same-run ratio."""
    return _anchor_file().get(gpu_name, {})


def anchor_row(section: str, match) -> dict | None:
    """This GPU's anchor row of `section` for which match(row) holds, or None."""
    import torch
    return next((row for row in anchors(torch.cuda.get_device_name()).get(section, []) if match(row)), None)
