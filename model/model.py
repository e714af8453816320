"""A small DeepSeek-V3: MLA attention, DeepSeekMoE with auxiliary-loss-free balancing, multi-token
prediction, trained in BF16 or with DeepSeek-V3's FP8 recipe, built on dskernels' public API.

    model = Transformer(preset("tiny"))
    logits = model(tokens)                                 # tokens [B, S] int64 -> [B, S, vocab] fp32
    loss, parts = model.loss(tokens)                       # next-token CE + mtp_loss_weight * MTP CE
    model.update_bias()                                    # after each optimizer step (balancing)

Precision (DeepSeek-V3's map): every Linear of attention, the dense FFN, the shared and the routed
experts runs its three GEMMs in FP8 with args.precision = "fp8" (dskernels.FP8Linear and
dskernels.moe.MoE), in bf16 otherwise; the embedding, the output head, the attention core (softmax
attention over bf16 q, k, v), the gate and the norms stay in bf16/fp32; parameters are fp32 master
weights. The residual stream is fp32; each block's inputs are bf16 (an RMSNorm's output).

MLA (training form): the query from a low-rank latent (wq_a, q_norm, wq_b), the keys and values from
the kv latent c = kv_norm(wkv_a(x)[:kv_lora_rank]) through wkv_b, per head [k_nope | k_rope] with one
rotary key k_rope shared by the heads (the decoupled RoPE): what generation caches is c and k_rope
alone, and the absorbed decode (model.generate) attends over them without forming k and v.
"""
import math

import torch
import torch.nn.functional as F

from dskernels import FP8Linear
from dskernels import moe as dmoe
from model.config import ModelArgs

BF16 = torch.bfloat16


class Linear(torch.nn.Linear):
    """nn.Linear over an fp32 master weight with a bf16 GEMM (fp32 sums, bf16 out): the BF16 model's."""

    def forward(self, x):
        return F.linear(x.to(BF16), self.weight.to(BF16), None if self.bias is None else self.bias.to(BF16))


def linear(args: ModelArgs, in_features: int, out_features: int) -> torch.nn.Module:
    if args.precision == "fp8":
        return FP8Linear(in_features, out_features, bias=False, backend=args.backend)
    return Linear(in_features, out_features, bias=False)


class RMSNorm(torch.nn.Module):
    """x / rms(x) * weight in fp32, returned in bf16 (the next GEMM's input)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(BF16)


def rope_tables(args: ModelArgs, device=None):
    """cos, sin [max_seq_len, qk_rope_head_dim / 2] fp32: RoPE's rotation angles, with YaRN's frequency
    interpolation when the model runs past the context it was trained on (rope_factor > 1): rotations
    slower than beta_slow turns per original context are divided by the factor, faster than beta_fast
    kept, and a linear ramp between."""
    dim, theta = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)  # [dim / 2]
    if args.max_seq_len > args.original_seq_len and args.rope_factor > 1:
        def dim_of(turns):  # the pair index whose wavelength fits `turns` times in the original context
            return dim * math.log(args.original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(dim_of(args.beta_fast)), 0)
        high = min(math.ceil(dim_of(args.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64, device=device), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x [..., S, H, R] rotated pairwise ((x0, x1), (x2, x3), ...) by position: cos, sin [S, R / 2] (or
    [B, S, R / 2]: each sequence at its own positions, as decoding a ragged batch is)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]                      # [..., S, H, R / 2]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


class MLA(torch.nn.Module):
    """Multi-head latent attention, x [B, S, dim] bf16 -> [B, S, dim] bf16 (causal)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, r = args.n_heads, args.kv_lora_rank
        if args.q_lora_rank:
            self.wq_a = linear(args, args.dim, args.q_lora_rank)
            self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
            self.wq_b = linear(args, args.q_lora_rank, H * args.qk_head_dim)
        else:
            self.wq = linear(args, args.dim, H * args.qk_head_dim)
        self.wkv_a = linear(args, args.dim, r + args.qk_rope_head_dim)
        self.kv_norm = RMSNorm(r, args.norm_eps)
        self.wkv_b = linear(args, r, H * (args.qk_nope_head_dim + args.v_head_dim))  # per head: W_UK, W_UV rows
        self.wo = linear(args, H * args.v_head_dim, args.dim)

    def query(self, x):
        """q_nope [B, S, H, nope], q_rope [B, S, H, rope] (not yet rotated)."""
        a = self.args
        q = self.wq_b(self.q_norm(self.wq_a(x))) if a.q_lora_rank else self.wq(x)
        q = q.view(*x.shape[:2], a.n_heads, a.qk_head_dim)
        return q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)

    def latent(self, x):
        """The cached part: c = kv_norm(kv latent) [B, S, kv_lora_rank] bf16, k_rope [B, S, 1, rope]."""
        c, k_rope = self.wkv_a(x).split([self.args.kv_lora_rank, self.args.qk_rope_head_dim], dim=-1)
        return self.kv_norm(c), k_rope.unsqueeze(2)

    def forward(self, x, cos, sin):
        return self.forward_with_latent(x, cos, sin)[0]

    def forward_with_latent(self, x, cos, sin):
        """forward's output, and what a decode cache keeps of x: c [B, S, kv_lora_rank] bf16 and the
        rotated k_rope [B, S, 1, rope] (prefill writes them)."""
        a = self.args
        B, S, _ = x.shape
        q_nope, q_rope = self.query(x)
        c, k_rope = self.latent(x)
        q_rope, k_rope = apply_rope(q_rope, cos[:S], sin[:S]), apply_rope(k_rope, cos[:S], sin[:S])
        kv = self.wkv_b(c).view(B, S, a.n_heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)                                        # [B, S, H, qk]
        k = torch.cat([k_nope, k_rope.expand(-1, -1, a.n_heads, -1)], dim=-1)         # [B, S, H, qk]
        o = F.scaled_dot_product_attention(q.transpose(1, 2).to(BF16), k.transpose(1, 2).to(BF16),
                                           v.transpose(1, 2).to(BF16), is_causal=True, scale=a.softmax_scale())
        return self.wo(o.transpose(1, 2).reshape(B, S, a.n_heads * a.v_head_dim)), c, k_rope


class MLP(torch.nn.Module):
    """The dense layers' SwiGLU FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs, inter_dim: int):
        super().__init__()
        self.w1, self.w3 = linear(args, args.dim, inter_dim), linear(args, args.dim, inter_dim)
        self.w2 = linear(args, inter_dim, args.dim)

    def forward(self, x):
        return self.w2((F.silu(self.w1(x).float()) * self.w3(x).float()).to(BF16))


def moe_layer(args: ModelArgs) -> dmoe.MoE:
    return dmoe.MoE(args.dim, args.moe_inter_dim, args.n_routed_experts, args.n_activated_experts,
                    n_shared_experts=args.n_shared_experts, n_expert_groups=args.n_expert_groups,
                    n_limited_groups=args.n_limited_groups, route_scale=args.route_scale, score_func=args.score_func,
                    fp8=args.precision == "fp8", backend=args.backend)


class Block(torch.nn.Module):
    """Pre-norm residual block: h = h + attn(norm(h)); h = h + ffn(norm(h)), h fp32."""

    def __init__(self, args: ModelArgs, moe: bool):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn = moe_layer(args) if moe else MLP(args, args.inter_dim)

    def forward(self, h, cos, sin, attend=None):
        """attend(x, cos, sin) replaces the attention (generation's prefill and absorbed decode)."""
        h = h + (attend or self.attn)(self.attn_norm(h), cos, sin).float()
        return h + self.ffn(self.ffn_norm(h)).float()


class MTP(torch.nn.Module):
    """Multi-token prediction, depth 1: from the main model's last hidden state at position i and the
    embedding of token i + 1, predict token i + 2 through one more block and its own final norm (the
    embedding and the output head are the main model's). The projection takes [e_norm(emb); h_norm(h)],
    the order of DeepSeek-V3's released eh_proj weights."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.h_norm, self.e_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)
        self.proj = linear(args, 2 * args.dim, args.dim)
        self.block = Block(args, moe=args.n_layers > args.n_dense_layers)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h, emb_next, cos, sin):
        """h [B, S', dim] fp32 (positions 0 .. S' - 1), emb_next [B, S', dim] (tokens 1 .. S') -> the
        normalized hidden state [B, S', dim] bf16 for the output head."""
        x = self.proj(torch.cat([self.e_norm(emb_next), self.h_norm(h)], dim=-1)).float()
        return self.norm(self.block(x, cos, sin))


class Transformer(torch.nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args.check()
        self.embed = torch.nn.Embedding(args.vocab_size, args.dim)
        self.layers = torch.nn.ModuleList(Block(args, moe=i >= args.n_dense_layers) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = Linear(args.dim, args.vocab_size, bias=False)  # bf16 in both precisions
        self.mtp = MTP(args) if args.mtp_depth else None
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        torch.nn.init.normal_(self.embed.weight, std=0.02)

    def hidden(self, tokens):
        """tokens [B, S] -> the last block's output [B, S, dim] fp32 (before the final norm)."""
        if tokens.shape[1] > self.args.max_seq_len:
            raise ValueError(f"tokens must be at most max_seq_len = {self.args.max_seq_len} long, got "
                             f"{tokens.shape[1]}")
        h = self.embed(tokens).float()
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return h

    def logits(self, h):
        return self.head(self.norm(h)).float()

    def forward(self, tokens, return_loss: bool = False):
        """tokens [B, S] int64 -> next-token logits [B, S, vocab_size] fp32; return_loss: loss(tokens)
        instead (the training step's call, through DDP's forward)."""
        return self.loss(tokens) if return_loss else self.logits(self.hidden(tokens))

    def loss(self, tokens):
        """tokens [B, S + 1]: the mean next-token cross entropy over positions 0 .. S - 1, plus
        mtp_loss_weight times the MTP module's over positions 0 .. S - 2 (each predicting two ahead).
        Returns (loss, {"main": ..., "mtp": ...}) with the parts detached."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        h = self.hidden(inputs)
        main = F.cross_entropy(self.logits(h).flatten(0, 1), targets.flatten())
        parts = {"main": main.detach()}
        loss = main
        if self.mtp is not None and inputs.shape[1] > 1:
            h_mtp = self.mtp(h[:, :-1], self.embed(targets[:, :-1]).float(), self.rope_cos, self.rope_sin)
            mtp = F.cross_entropy(self.head(h_mtp).float().flatten(0, 1), targets[:, 1:].flatten())
            parts["mtp"] = mtp.detach()
            loss = loss + self.args.mtp_loss_weight * mtp
        return loss, parts

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, dmoe.MoE)]

    @torch.no_grad()
    def expert_counts(self):
        """[n_moe_layers, n_routed_experts] int32: each MoE layer's expert loads in the last forward."""
        return torch.stack([m.last_counts for m in self.moe_layers()])

    @torch.no_grad()
    def update_bias(self, counts=None, gamma=None):
        """The auxiliary-loss-free balancing step for every MoE layer, from counts (expert_counts(), after
        an all-reduce under data parallelism) or the last forward's."""
        counts = self.expert_counts() if counts is None else counts
        gamma = self.args.bias_update_speed if gamma is None else gamma
        for m, c in zip(self.moe_layers(), counts):
            m.update_bias(c, gamma)
