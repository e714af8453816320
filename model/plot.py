"""Loss curves: python -m model.plot runs/tiny-bf16/log.jsonl runs/tiny-fp8/log.jsonl -o loss.png

Each input is a model.train log (log.jsonl: one record per step, the main loss under "main") or the
training-parity test's training_parity.json (its curves: BF16, FP8, a second BF16 seed, the broken FP8
recipe). The plot shows each run's main next-token loss against the step, smoothed over --smooth steps
(a centred moving average; 1: raw), and below it each run's smoothed gap to the first one. Needs
matplotlib (pip install matplotlib; the model extra).
"""
import argparse
import json
import os


def curves(path: str) -> dict:
    """{label: [main loss per step]} from a log.jsonl or a training_parity.json."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            losses = [json.loads(line)["main"] for line in f if line.strip()]
        return {os.path.basename(os.path.dirname(os.path.abspath(path))) or path: losses}  # (runs/NAME/log.jsonl)
    with open(path) as f:
        data = json.load(f)
    if "curves" not in data:
        raise ValueError(f"{path}: neither a log.jsonl nor a training_parity.json (no 'curves')")
    return dict(data["curves"])


def smoothed(values, width: int):
    if width <= 1:
        return list(values)
    half = width // 2
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half):i + half + 1]
        out.append(sum(window) / len(window))
    return out


def plot(runs: dict, out: str, smooth: int = 25, title: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 2])
    base_label = next(iter(runs))
    base = smoothed(runs[base_label], smooth)
    for label, losses in runs.items():
        s = smoothed(losses, smooth)
        top.plot(range(1, len(s) + 1), s, label=label, linewidth=1.2)
        if label == base_label:
            bottom.plot([], [])  # (keeps each run's colour in both panels)
            continue
        n = min(len(s), len(base))
        bottom.plot(range(1, n + 1), [a - b for a, b in zip(s[:n], base[:n])], label=f"{label} - {base_label}",
                    linewidth=1.0)
    top.set_ylabel(f"main loss (nats, {smooth}-step mean)")
    top.set_title(title or "training loss")
    top.legend()
    top.grid(alpha=0.3)
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_ylabel("gap to the first run (nats)")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="log.jsonl files or a training_parity.json")
    p.add_argument("-o", "--out", default="loss.png")
    p.add_argument("--smooth", type=int, default=25)
    p.add_argument("--title")
    a = p.parse_args(argv)
    runs = {}
    for path in a.inputs:
        for label, losses in curves(path).items():
            runs[label if label not in runs else f"{label} ({path})"] = losses
    plot(runs, a.out, a.smooth, a.title)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
