"""Markdown tables from bench/results/<gpu>.json: one table per op, a row per shape and backend.

    python -m bench.report bench/results/nvidia-h100-80gb-hbm3.json
"""
import json
import math
import sys
from collections import defaultdict


def fmt_shape(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def us(x) -> str:
    return "-" if x is None else f"{x:.1f}"


# The anchors' figures a record may carry (bench/anchors.json, another run): name, field, our speed as a
# multiple of theirs.
ANCHORS = [("DeepGEMM", "deepgemm_tflops", lambda r, tflops: r["TFLOPS"] / tflops),
           ("DeepGEMM", "dg_tflops", lambda r, tflops: r["TFLOPS"] / tflops),  # (the H200 grouped rows' name)
           ("FlashMLA", "flashmla_us", lambda r, theirs: theirs / r.get("graph_us", r["time_us"]))]


def tables(data: dict) -> str:
    meta, ceil = data["meta"], data["ceilings"] or {}
    lines = [f"{meta['gpu']} (driver {meta.get('driver', '?')}, torch {meta['torch']}, triton "
             f"{meta['triton']}); ceilings of the latest run (each record keeps its own run's): copy {ceil.get('copy_GBps', 0):.0f} GB/s, "
             f"bf16 {ceil.get('bf16_TFLOPS', 0):.0f} TFLOPS, fp8 {ceil.get('fp8_TFLOPS', 0):.0f} TFLOPS", ""]
    by_op = defaultdict(list)
    for r in data["records"]:
        if r.get("kind") != "model":
            by_op[r["op"]].append(r)
    for op, recs in by_op.items():
        peer = next((r["peer"] for r in recs if r.get("peer")), "-")
        others = sorted({k for r in recs for k in r if k.startswith("speedup_vs_") and k != "speedup_vs_peer"})
        heads = {r.get("headline", "graph") for r in recs}
        anchors = [a for a in ANCHORS if any(a[1] in r for r in recs)]
        head = ["shape", "backend", "graph (us)", "eager (us)", "host (us)", "TFLOPS", "GB/s", "of ceiling",
                "peer graph / eager / host (us)", "vs peer (graph)", "vs peer (eager)"]
        head += [f"vs {k[len('speedup_vs_'):]} ({'/'.join(sorted(heads))})" for k in others] + [f"vs {a[0]} (other run)" for a in anchors]
        lines += [f"**{op}** (peer: {peer})", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for r in sorted(recs, key=lambda r: (fmt_shape(r["shape"]), r["backend"])):
            row = [fmt_shape(r["shape"]), r["backend"], us(r.get("graph_us", r["time_us"])), us(r.get("eager_us")),
                   us(r.get("host_us")), f"{r['TFLOPS']:.1f}", f"{r['GBps']:.0f}",
                   f"{100 * r['fraction_of_ceiling']:.0f}% {r['bound']}",
                   " / ".join(us(r.get(f"peer_{k}_us")) for k in ("graph", "eager", "host")),
                   ratio(r.get("graph_speedup_vs_peer", r.get("speedup_vs_peer"))), ratio(r.get("eager_speedup_vs_peer"))]
            row += [ratio(r.get(k)) for k in others]
            row += [ratio(speed(r, r[key]) if key in r else None) for _, key, speed in anchors]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines += summary(recs)
    return "\n".join(lines)


def model_tables(data: dict) -> str:
    """The model's training steps (bench/test_model.py): a row per preset and precision, then each
    preset's step time by kind of kernel."""
    recs = sorted((r for r in data["records"] if r.get("op") == "model_train_step"),
                  key=lambda r: (r["shape"]["tokens"], r["backend"]))
    if not recs:
        return ""
    head = ["preset", "tokens/step", "precision", "step (ms)", "tokens/s", "MFU", "vs BF16", "GEMMs vs BF16",
            "GEMM share (BF16)", "bound from the GEMMs"]
    lines = ["**model_train_step**", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in recs:
        get = r.get
        lines.append("| " + " | ".join([
            r["shape"]["preset"], str(r["shape"]["tokens"]), r["backend"], f"{r['step_ms']:.1f}",
            f"{r['tokens_per_s']:,}", f"{100 * r['mfu']:.1f}%", ratio(get("speedup_vs_bf16")), ratio(get("gemm_speedup")),
            "-" if get("gemm_share_of_bf16_step") is None else f"{100 * r['gemm_share_of_bf16_step']:.0f}%",
            ratio(get("speedup_bound_from_gemms"))]) + " |")
    kinds = list(recs[0]["breakdown_ms"])
    cols = [f"{r['shape']['preset']} {r['backend']}" for r in recs]
    lines += ["", "GPU time per step by kind of kernel (ms; profiled steps):", "",
              "| kind | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in kinds + ["(all kernels)", "(step, wall clock)"]:
        vals = [r["gpu_ms"] if k == "(all kernels)" else r["step_ms"] if k.startswith("(step") else
                r["breakdown_ms"].get(k, 0.0) for r in recs]
        lines.append(f"| {k} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines + [""])


def summary(recs) -> list:
    """Per backend, over a grid of shapes against one peer: the geomean of the graph-time ratio, and the
    worst shape among those whose kernel runs 20 us or longer (where launch latency no longer decides)."""
    lines = []
    for backend in sorted({r["backend"] for r in recs}):
        pairs = [(r, r["graph_speedup_vs_peer"]) for r in recs if r["backend"] == backend and
                 r.get("graph_speedup_vs_peer")]
        if len(pairs) < 10:
            continue
        geo = math.exp(sum(math.log(v) for _, v in pairs) / len(pairs))
        long = [(v, r) for r, v in pairs if r.get("graph_us", 0) >= 20]
        line = f"{backend}: geomean vs peer (graph) over {len(pairs)} shapes {geo:.2f}x"
        if long:
            v, r = min(long, key=lambda t: t[0])
            line += f"; worst at >= 20 us {v:.2f}x ({fmt_shape(r['shape'])}, {r['graph_us']:.1f} us)"
        lines.append(line)
    return lines + [""] if lines else []


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            data = json.load(f)
            print(tables(data))
            print(model_tables(data))
