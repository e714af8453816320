"""Training data that needs no download: the Python standard library's own sources (every machine with
Python has them), read in sorted path order, under a byte-level tokenizer (token = byte, vocab 256).

Batches are a function of (seed, step) alone: a BF16 and an FP8 run of the same seed see the same data in
the same order, and a resumed run sees what an uninterrupted one would. Under data parallelism every rank
draws the global batch and keeps its own rows.
"""
import functools
import os
import sysconfig

import torch

VOCAB_SIZE = 256


def encode(text: str) -> torch.Tensor:
    raw = text.encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def corpus(max_bytes: int = 16 << 20) -> torch.Tensor:
    """The first max_bytes of the standard library's .py files, concatenated in sorted path order, as
    uint8 [N] (16 MiB by default: far more than the presets train on)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, size = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                chunks.append(f.read() + b"\n\n")
            size += len(chunks[-1])
            if size >= max_bytes:
                break
        if size >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources under {root}: the training data is the standard library's")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


def split(data: torch.Tensor, which: str) -> torch.Tensor:
    """The last 1 / 64 is held out for validation."""
    cut = len(data) - len(data) // 64
    return data[:cut] if which == "train" else data[cut:]


def batch(data: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0,
          world_size: int = 1) -> torch.Tensor:
    """tokens [batch_size / world_size, seq_len + 1] int64 (inputs and the next tokens): this rank's rows
    of the global batch of step `step`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
    rows = starts[rank::world_size]
    return torch.stack([data[s:s + seq_len + 1] for s in rows.tolist()]).long()
