"""Benchmark session: skips without a GPU; measures the ceilings once; collects every record and
writes bench/results/<gpu-slug>.json (and a copy into $DSKERNELS_BENCH_OUT when set) after each one.

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
    peer=..., peer_fn=..., more_peers={name: fn}, headline="graph"|"eager"): times fn and every peer
    three ways (Timer.all: graph, eager, host), files the record, and runs pytest-benchmark on a
    synchronized call so its own table exists too."""
    def run(*, fn, peer_fn=None, more_peers=None, headline="graph", **fields):
        times = timer.all(fn)
        peer_times = timer.all(peer_fn) if peer_fn is not None else None
        extra = dict(fields.pop("extra", {}))
        for name, other in (more_peers or {}).items():  # second peers: their times and our speedups
            other_times = timer.all(other)
            extra.update({f"{name}_{k}": round(v, 3) for k, v in other_times.items()})
            extra[f"{name}_us"] = round(other_times[f"{headline}_us"], 3)
            extra[f"speedup_vs_{name}"] = round(other_times[f"{headline}_us"] / times[f"{headline}_us"], 3)
        rec = make_record(times=times, peer_times=peer_times, ceilings=ceilings, headline=headline,
                          extra=extra, **fields)
        _SESSION["records"].append(rec)
        _write_results()
        benchmark.extra_info.update(rec)
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=10, warmup_rounds=1)
        return rec
    return run


def file_record(rec: dict):
    """Files a record made outside report() (the model's training steps), or again after adding fields to
    one report() returned: it replaces this run's record with the same op, backend and shape."""
    _SESSION["records"][:] = [r for r in _SESSION["records"] if _key(r) != _key(rec)] + [rec]
    _write_results()


def _key(rec):
    return rec["op"], rec["backend"], json.dumps(rec["shape"], sort_keys=True)


def _write_results():
    """Merge this run's records into the GPU's results file: a record replaces the one with the same
    op, backend and shape; records of benchmarks not run this time stay. Called after every record, so a
    run cut short by a time limit keeps what it measured."""
    meta = gpu_metadata()
    path = RESULTS / f"{gpu_slug(meta['gpu'])}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    old = previous.get("records", [])
    new_keys = {_key(r) for r in _SESSION["records"]}
    records = [r for r in old if _key(r) not in new_keys] + _SESSION["records"]
    ceilings = _SESSION["ceilings"] or previous.get("ceilings")  # (a run of the model's benchmarks measures none)
    text = json.dumps({"meta": meta, "ceilings": ceilings, "records": records}, indent=1)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(text + "\n")
    if os.environ.get("DSKERNELS_BENCH_OUT"):
        out = Path(os.environ["DSKERNELS_BENCH_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / path.name).write_text(text + "\n")
