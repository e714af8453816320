"""The benchmark dashboard: one static HTML page with a section per GPU type, built from
bench/results/*.json. Per op, a bar per (shape, backend) shows the fraction of the ceiling measured in
the same run, with the time and the speedup over the peer beside it.

    python -m bench.dashboard [OUT.html]        (default: bench/dashboard.html)
"""
import html
import json
import sys
from collections import defaultdict
from pathlib import Path

from bench.report import fmt_shape

RESULTS = Path(__file__).parent / "results"
COLORS = {"cuda": "#2b6cb0", "triton": "#d69e2e", "reference": "#718096"}


def bars(records) -> str:
    rows, width, h = [], 360, 18
    recs = sorted(records, key=lambda r: (fmt_shape(r["shape"]), r["backend"]))
    for i, r in enumerate(recs):
        frac = r["fraction_of_ceiling"]
        y = i * (h + 4)
        peer = f", {r['speedup_vs_peer']:.2f}x peer" if "speedup_vs_peer" in r else ""
        label = html.escape(f"{fmt_shape(r['shape'])} [{r['backend']}]")
        rows.append(f'<text x="0" y="{y + 13}" font-size="11">{label}</text>'
                    f'<rect x="300" y="{y}" width="{min(frac, 1.2) * width:.1f}" height="{h}" '
                    f'fill="{COLORS.get(r["backend"], "#555")}"/>'
                    f'<line x1="{300 + width}" y1="{y}" x2="{300 + width}" y2="{y + h}" stroke="#000"/>'
                    f'<text x="{305 + min(frac, 1.2) * width:.1f}" y="{y + 13}" font-size="11">'
                    f'{100 * frac:.0f}% ({r["time_us"]:.1f} us{peer})</text>')
    return (f'<svg width="900" height="{len(recs) * (h + 4)}" xmlns="http://www.w3.org/2000/svg">'
            + "".join(rows) + "</svg>")


def page(files) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>dskernels benchmarks</title>",
             "<style>body{font-family:sans-serif;margin:2em}h2{margin-top:2em}</style>",
             "<h1>dskernels benchmarks</h1><p>Bars: fraction of the ceiling measured in the same run "
             "(the black line is 100%); blue CUDA, yellow Triton. Command: <code>bash ci/gpu.sh OUT</code>, "
             "then <code>python -m bench.dashboard</code>.</p>"]
    for path in files:
        data = json.loads(path.read_text())
        meta, ceil = data["meta"], data["ceilings"] or {}
        parts.append(f"<h2>{html.escape(meta['gpu'])}</h2><p>driver {html.escape(str(meta.get('driver', '?')))}, "
                     f"torch {html.escape(meta['torch'])}, triton {html.escape(meta['triton'])}; ceilings: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()) + "</p>")
        by_op = defaultdict(list)
        for r in data["records"]:
            by_op[r["op"]].append(r)
        for op, recs in by_op.items():
            bound = recs[0]["bound"]
            parts.append(f"<h3>{html.escape(op)} <small>(of {html.escape(bound)})</small></h3>{bars(recs)}")
    return "\n".join(parts)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "dashboard.html"
    out.write_text(page(sorted(RESULTS.glob("*.json"))))
    print(f"wrote {out}")
