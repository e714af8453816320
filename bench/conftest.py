"""Benchmark session: skips without a GPU; measures the ceilings once; collects every record and
writes bench/results/<gpu-slug>.json (and a copy into $DSKERNELS_BENCH_OUT when set) at the end.

Run: pytest bench/ --benchmark-json=out.json   (records also land in each benchmark's extra_info)
"""
import json
import os
from pathlib import Path

import pytest
import torch

from bench.harness import Timer, gpu_metadata, gpu_slug, make_record, measure_ceilings

RESULTS = Path(__file__).parent / "results"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def timer():
    return Timer()


_SESSION = {"records": [], "ceilings": None}


@pytest.fixture(scope="session")
def ceilings(timer):
    _SESSION["ceilings"] = measure_ceilings(timer)
    return _SESSION["ceilings"]


@pytest.fixture
def report(benchmark, ceilings, timer):
    """report(op=..., backend=..., shape=..., fn=..., flops=..., bytes_moved=..., bound=...,
    peer=..., peer_fn=...): times fn (and the peer) on the GPU, files the record, and runs
    pytest-benchmark on a synchronized graph-free call so its own table exists too."""
    def run(*, fn, peer_fn=None, more_peers=None, **fields):
        time_us = timer(fn)
        peer_us = timer(peer_fn) if peer_fn is not None else None
        extra = dict(fields.pop("extra", {}))
        for name, other in (more_peers or {}).items():  # second peers: time and speedup
            other_us = timer(other)
            extra[f"{name}_us"] = round(other_us, 3)
            extra[f"speedup_vs_{name}"] = round(other_us / time_us, 3)
        rec = make_record(time_us=time_us, peer_us=peer_us, ceilings=ceilings, extra=extra, **fields)
        _SESSION["records"].append(rec)
        benchmark.extra_info.update(rec)
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=10, warmup_rounds=1)
        return rec
    return run


def _key(rec):
    return rec["op"], rec["backend"], json.dumps(rec["shape"], sort_keys=True)


def pytest_sessionfinish(session, exitstatus):
    """Merge this run's records into the GPU's results file: a record replaces the one with the same
    op, backend and shape; records of benchmarks not run this time stay."""
    if not _SESSION["records"]:
        return
    meta = gpu_metadata()
    path = RESULTS / f"{gpu_slug(meta['gpu'])}.json"
    old = json.loads(path.read_text())["records"] if path.exists() else []
    new_keys = {_key(r) for r in _SESSION["records"]}
    records = [r for r in old if _key(r) not in new_keys] + _SESSION["records"]
    text = json.dumps({"meta": meta, "ceilings": _SESSION["ceilings"], "records": records}, indent=1)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(text + "\n")
    if os.environ.get("DSKERNELS_BENCH_OUT"):
        out = Path(os.environ["DSKERNELS_BENCH_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / path.name).write_text(text + "\n")
