"""Train the reference model: python -m model.train --preset tiny [--precision fp8] [--steps N] ...

AdamW (torch's fused implementation on a GPU) with linear warmup and cosine decay to a tenth, gradient
clipping at 1.0, fp32 master weights; after every optimizer step the MoE layers' balancing bias moves
(auxiliary-loss-free: bias -= gamma * sign(load - mean load), the loads summed over data-parallel ranks
first, so every rank moves alike). A progress line shows the loss, tokens/s, MFU (FP8 counted at the BF16
peak, as DeepSeek-V3 reports it) and the expert load balance (max / mean over experts, worst layer);
--out-dir (default runs/PRESET-PRECISION) gets log.jsonl (one record per step) and ckpt.pt, from which
--resume continues bit for bit.

Data parallel: torchrun --nproc_per_node N -m model.train ... (DDP over gloo on CPUs, NCCL on GPUs); the
global batch is split over the ranks.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import data
from model.config import backend_for, preset
from model.model import Transformer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0}  # dense BF16 tensor-core peaks


@dataclass
class TrainConfig:
    preset: str = "tiny"
    precision: str = "bf16"
    steps: int = 300
    batch_size: int = 16          # sequences per step (global, over all ranks)
    micro_batches: int = 1        # each rank's share run in this many forward/backward passes (the gradients
                                  # summed before the step: the same step in less activation memory)
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    gamma: float | None = None    # the balancing bias's speed (None: the preset's bias_update_speed)
    seed: int = 0
    out_dir: str | None = None    # log.jsonl and ckpt.pt go here (None: nothing written)
    ckpt_every: int = 0           # steps between checkpoints (0: at the end only)
    stop_after: int = 0           # stop (checkpointing) after this step, as if interrupted (0: run all steps)
    resume: bool = False
    device: str = "auto"          # "cpu", "cuda" or "auto"
    log_every: int = 10
    quiet: bool = False


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """6 x the parameters a token passes through (routed experts: only the activated ones) plus the
    attention core's 6 x 2 x S/2 x heads x (qk + v) dims per layer (causal: half the keys on average)."""
    a = model.args
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed"):
            continue
        n = p.numel()
        if name.endswith(("w13", "w2")) and "shared" not in name:
            n = n * a.n_activated_experts // a.n_routed_experts
        total += n
    blocks = a.n_layers + (1 if model.mtp is not None else 0)
    attn = 6 * blocks * seq_len * a.n_heads * (a.qk_head_dim + a.v_head_dim)
    return 6 * total + attn


class Progress:
    """One line, rewritten in place on a terminal (printed every log_every steps otherwise)."""

    def __init__(self, total, quiet, rank):
        self.total, self.quiet = total, quiet or rank != 0
        self.tty = sys.stderr.isatty()

    def show(self, step, text, every):
        if self.quiet or not (self.tty or step % every == 0 or step == self.total):
            return
        done = int(24 * step / self.total)
        line = f"[{'#' * done}{'.' * (24 - done)}] {step}/{self.total} {text}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.tty and not self.quiet:
            print(file=sys.stderr)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def train(cfg: TrainConfig, on_step=None):
    """Runs cfg.steps optimizer steps (from the checkpoint's when resuming); returns (model, log records).
    on_step(record), when given, is called after each step (a profiler's step marker, say)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = pick_device(cfg.device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size must be a multiple of the {world} ranks, got {cfg.batch_size}")
    if cfg.micro_batches < 1 or (cfg.batch_size // world) % cfg.micro_batches:
        raise ValueError(f"micro_batches must divide each rank's {cfg.batch_size // world} sequences, got "
                         f"{cfg.micro_batches}")
    base = preset(cfg.preset)  # (raises naming the presets)
    args = preset(cfg.preset, precision=cfg.precision, max_seq_len=max(base.max_seq_len, cfg.seq_len),
                  backend=backend_for(device))
    gamma = args.bias_update_speed if cfg.gamma is None else cfg.gamma

    torch.manual_seed(cfg.seed)
    with device:  # the parameters made and initialized where they live (the bench preset's 4.7 B too)
        model = Transformer(args)
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if distributed else model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    start, log = 0, []
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt") if cfg.out_dir else None
    if cfg.resume and ckpt and os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
    corpus = data.split(data.corpus(), "train")
    per_token = flops_per_token(model, cfg.seq_len)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if device.type == "cuda" and
                 k in torch.cuda.get_device_name(device)), None)
    progress = Progress(cfg.steps, cfg.quiet, rank)
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    for step in range(start, end):
        t0 = time.perf_counter()
        tokens = data.batch(corpus, step, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss, parts, counts = forward_backward(net, model, tokens, cfg.micro_batches, distributed)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if distributed:
            dist.all_reduce(counts)  # every rank's bias must move alike
        model.update_bias(counts, gamma)
        loads = counts.float()
        balance = float((loads.max(dim=1).values / loads.mean(dim=1)).max()) if loads.numel() else 1.0
        record = {"step": step + 1, "loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()},
                  "grad_norm": float(norm), "lr": lr_at(cfg, step), "balance": balance}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        record["tokens_per_s"] = cfg.batch_size * cfg.seq_len / dt
        record["mfu"] = record["tokens_per_s"] * per_token / (peak * 1e12) if peak else None
        log.append(record)
        if on_step is not None:
            on_step(record)
        mfu = f" mfu {record['mfu']:.1%}" if peak else ""
        progress.show(step + 1, f"loss {record['loss']:.3f} tok/s {record['tokens_per_s']:.0f}{mfu} "
                                f"load max/mean {balance:.2f}", cfg.log_every)
        last = step + 1 == end
        if ckpt and rank == 0 and (last or cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0):
            save(ckpt, model, opt, step + 1, log, cfg)
    progress.close()
    if ckpt and rank == 0:
        with open(os.path.join(cfg.out_dir, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)
    return model, log


def forward_backward(net, model, tokens, micro_batches, distributed):
    """The step's loss and its gradients, over tokens [b, S + 1] in micro_batches equal passes (each one's
    loss scaled by 1 / micro_batches, so the gradients are the whole batch's mean; DDP reduces them in
    the last pass only) -> (loss, its parts, the expert loads summed over the passes), detached."""
    total, parts, counts = 0.0, {}, None
    chunks = tokens.chunk(micro_batches)
    for i, chunk in enumerate(chunks):
        sync = contextlib.nullcontext() if not distributed or i + 1 == len(chunks) else net.no_sync()
        with sync:
            loss, p = net(chunk, return_loss=True)  # (through DDP's forward: its hooks reduce the gradients)
            (loss / len(chunks)).backward()
        total = total + loss.detach() / len(chunks)
        parts = {k: parts.get(k, 0.0) + v / len(chunks) for k, v in p.items()}
        c = model.expert_counts()
        counts = c if counts is None else counts + c
    return total, parts, counts


def save(path, model, opt, step, log, cfg):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "log": log,
                "args": dataclasses.asdict(model.args), "train": dataclasses.asdict(cfg)}, tmp)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=_parser_type(f.type), default=f.default)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.out_dir is None:
        cfg.out_dir = os.path.join("runs", f"{cfg.preset}-{cfg.precision}")
    _, log = train(cfg)
    if log and not cfg.quiet:
        first, last = log[0], log[-1]
        print(f"trained {cfg.preset} ({cfg.precision}) to step {last['step']}: loss {first['loss']:.3f} -> "
              f"{last['loss']:.3f}; log and checkpoint in {cfg.out_dir}", file=sys.stderr)


def _parser_type(annotation):
    text = str(annotation)
    for name, kind in (("float", float), ("int", int), ("str", str)):
        if name in text:
            return kind
    raise TypeError(annotation)


if __name__ == "__main__":
    main()
