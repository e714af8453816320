"""Generate with the reference model: python -m model.generate --ckpt runs/tiny-bf16/ckpt.pt --prompt "def "
(or --deepseek DIR: a checkpoint in DeepSeek-V3's released format, model.deepseek).

Prefill runs each prompt through the training forward (full attention over its tokens) and writes every
layer's kv latent c and rotated RoPE key into that layer's paged cache (dskernels.mla.append_to_cache).
A decode step never forms k or v: the query's non-RoPE part is absorbed into the latent space
(q_nope W_UK, dskernels.mla.absorb_query), attention runs over the cached [c | k_rope] rows
(dskernels.mla.mla_decode, one metadata for all layers per step), and its output leaves the latent space
through W_UV (absorb_output) before wo; the MoE layers run over masked layouts (the masked grouped
GEMMs). A ragged batch decodes together, each sequence at its own position. On a GPU each decode step
(or speculative step) after the first replays one CUDA graph: the step's kernels without the host's
launches in between.

Generator(model, attention="naive") is the un-absorbed baseline DeepSeek-V3's inference code calls
"naive": per-head keys [k_nope | k_rope] and values cached ([B, max_len, H, 192] and [B, max_len, H, 128]
bf16 per layer: 640 x n_heads bytes a token against the latent's 1152, 13 times as much at the bench
preset's 24 heads, 71 times at DeepSeek-V3's 128), softmax attention over them (torch's
scaled_dot_product_attention with a mask of each sequence's length).
"""
import argparse
import sys

import torch

from dskernels import dequant, mla, per_block_quant
from model import data
from model.config import ModelArgs, backend_for, preset
from model.model import BF16, Transformer, apply_rope

PAGE = mla.PAGE_SIZE  # tokens per cache page


def check_decodable(args: ModelArgs):
    """Raises unless the model's MLA head dims are the ones dskernels.mla's absorbed decode takes."""
    dims = (args.kv_lora_rank, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim)
    if dims != (512, 128, 64, 128):
        raise ValueError(f"the absorbed decode takes DeepSeek-V3's head dims (kv_lora_rank, qk_nope_head_dim, "
                         f"qk_rope_head_dim, v_head_dim) = (512, 128, 64, 128), got {dims}")


ATTENTION = ("absorb", "naive")


class PagedCache:
    """One paged latent cache per block, [num_pages, 64, 1, 576] bf16, sharing one block table (sequence b
    owns pages b * pages_per_seq ...) and cache_seqlens [B] int32; the MTP block's own cache and lengths
    beside them when the model has one (speculative decoding). attention="naive": per block the keys
    [B, max_len, H, 192] and values [B, max_len, H, 128] bf16 instead (the un-absorbed baseline)."""

    def __init__(self, model: Transformer, batch: int, max_len: int, device, attention: str = "absorb"):
        a = model.args
        pages = -(-max_len // PAGE)
        self.num_pages = batch * pages
        self.block_table = torch.arange(self.num_pages, dtype=torch.int32, device=device).view(batch, pages)
        width = a.kv_lora_rank + a.qk_rope_head_dim
        if attention == "naive":
            def new():
                return (torch.zeros(batch, max_len, a.n_heads, a.qk_head_dim, dtype=BF16, device=device),
                        torch.zeros(batch, max_len, a.n_heads, a.v_head_dim, dtype=BF16, device=device))
        else:
            def new():
                return torch.zeros(self.num_pages, PAGE, 1, width, dtype=BF16, device=device)
        self.caches = [new() for _ in model.layers]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.mtp_cache = new() if model.mtp is not None else None
        self.mtp_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)


class Generator:
    """Prefill and absorbed decode for a Transformer (its weights as they are: make a new one after
    training), greedy speculative decoding with its MTP module. attention: "absorb" (the latent cache and
    dskernels.mla) or "naive" (per-head K and V cached, the baseline); cuda_graph: replay each decode step
    as a CUDA graph (default: on a GPU). An FP8 model's captured step quantizes its weights inside the
    graph on every replay (FP8Linear and MoE do not serve their caches to a capture), which a BF16 model
    (bf16_weights) does not pay."""

    def __init__(self, model: Transformer, attention: str = "absorb", cuda_graph: bool | None = None):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if attention == "absorb":
            check_decodable(model.args)
        self.model, self.args, self.attention = model, model.args, attention
        self.backend = "reference" if self.args.backend == "reference" else "auto"
        on_gpu = model.rope_cos.is_cuda
        if cuda_graph and not on_gpu:
            raise ValueError("cuda_graph: the model is not on a GPU")
        self.cuda_graph = on_gpu if cuda_graph is None else cuda_graph
        absorbed = self._absorbed_weight if attention == "absorb" else lambda attn: None  # (naive: unused)
        self.wkv_b = [absorbed(layer.attn) for layer in model.layers]  # [H * 256, 512] each
        self.mtp_wkv_b = absorbed(model.mtp.block.attn) if model.mtp is not None else None

    def _absorbed_weight(self, attn):
        """wkv_b in bf16 as the model's own forward applies it: the fp32 master rounded, or (FP8) its e4m3
        blocks dequantized, the weight FP8Linear multiplies by."""
        w = attn.wkv_b.weight.detach()
        if self.args.precision != "fp8":
            return w.to(BF16)
        q, scale = per_block_quant(w.float().contiguous(), backend=self.backend)
        return dequant(q, scale, block_shape=(128, 128), out_dtype=BF16, backend=self.backend)

    @torch.no_grad()
    def prefill(self, cache: PagedCache, prompts, mtp: bool = False):
        """prompts: B lists of token ids (non-empty) -> (logits [B, vocab] fp32 of each prompt's last token,
        hidden [B, 2, dim] fp32: the last block's output at its last two positions). mtp: also fill the MTP
        block's cache over positions 0 .. len - 3 (speculative decoding redoes len - 2 and does len - 1)."""
        m, logits, hidden = self.model, [], []
        for b, prompt in enumerate(prompts):
            tokens = torch.tensor([prompt], dtype=torch.long, device=cache.seqlens.device)
            h = m.embed(tokens).float()
            for layer, kv in zip(m.layers, cache.caches):
                h = layer(h, m.rope_cos, m.rope_sin, attend=self._prefill_attention(layer.attn, kv, cache, b))
            logits.append(m.logits(h)[:, -1])
            hidden.append(h[:, -2:] if h.shape[1] > 1 else h.new_zeros(1, 2, h.shape[2]))
            cache.seqlens[b] = len(prompt)
            if mtp and len(prompt) > 2:
                x = self._mtp_input(h[:, :-2], tokens[:, 1:-1])
                m.mtp.block(x, m.rope_cos, m.rope_sin, attend=self._prefill_attention(m.mtp.block.attn, cache.mtp_cache,
                                                                                       cache, b, mtp=True))
            cache.mtp_seqlens[b] = max(len(prompt) - 2, 0)
        return torch.cat(logits), torch.cat(hidden)

    def _prefill_attention(self, attn, kv, cache, b, mtp=False):
        """The training attention over a whole prompt, writing its latents (or keys and values) into kv
        (sequence b)."""
        seqlens = cache.mtp_seqlens if mtp else cache.seqlens

        def attend(x, cos, sin):
            o, c, k_rope = attn.forward_with_latent(x, cos, sin)
            if self.attention == "naive":
                start = seqlens[b:b + 1]
                self._naive_append(attn, kv, start[:, None] + torch.arange(x.shape[1], device=x.device), b, c, k_rope)
            else:
                mla.append_to_cache(kv, cache.block_table[b:b + 1], seqlens[b:b + 1], c.to(BF16),
                                    k_rope[:, :, 0].to(BF16), backend=self.backend)
            return o
        return attend

    def _naive_append(self, attn, kv, positions, batch, c, k_rope):
        """The naive cache's rows at positions [b, s] of sequences `batch` (an index, or [B, 1]): keys
        [k_nope | k_rope] and values from the latent c through wkv_b."""
        a = self.args
        k_nope, v = attn.wkv_b(c).view(*c.shape[:2], a.n_heads, -1).split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, a.n_heads, -1)], dim=-1)
        kv[0][batch, positions] = k.to(BF16)
        kv[1][batch, positions] = v.to(BF16)

    def _naive_attention(self, attn, kv, before, cos, sin):
        """Un-absorbed attention for s new tokens per sequence at positions before .. before + s - 1: their
        keys and values written into kv, softmax attention over each sequence's first before + s rows."""
        a = self.args

        def attend(x, _cos, _sin):
            B, s = x.shape[:2]
            q_nope, q_rope = attn.query(x)
            c, k_rope = attn.latent(x)
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
            positions = before[:, None].long() + torch.arange(s, device=x.device)           # [B, s]
            self._naive_append(attn, kv, positions, torch.arange(B, device=x.device)[:, None], c, k_rope)
            keys, values = kv
            mask = torch.arange(keys.shape[1], device=x.device) <= positions[:, :, None]     # [B, s, max_len]
            q = torch.cat([q_nope, q_rope], dim=-1).to(BF16)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None],
                scale=a.softmax_scale())
            return attn.wo(o.transpose(1, 2).reshape(B, s, a.n_heads * a.v_head_dim))
        return attend

    def _absorbed_attention(self, attn, wkv_b, kv, cache, before, md, cos, sin):
        """Absorbed MLA for s new tokens per sequence at positions before .. before + s - 1: their latents
        appended to kv, attention over the cache (causal among the s), out through W_UV and wo."""
        a = self.args

        def attend(x, _cos, _sin):
            q_nope, q_rope = attn.query(x)                                           # [B, s, H, 128], [..., 64]
            c, k_rope = attn.latent(x)
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
            mla.append_to_cache(kv, cache.block_table, before, c.to(BF16), k_rope[:, :, 0].to(BF16),
                                backend=self.backend)
            q = torch.cat([mla.absorb_query(q_nope.to(BF16), wkv_b), q_rope.to(BF16)], dim=-1)
            o, _ = mla.mla_decode(q, kv, cache.block_table, before + x.shape[1], a.softmax_scale(), metadata=md,
                                  backend=self.backend)
            o = mla.absorb_output(o, wkv_b)                                          # [B, s, H, 128]
            return attn.wo(o.reshape(*o.shape[:2], a.n_heads * a.v_head_dim))
        return attend

    def _blocks(self, blocks, caches, wkv_bs, h, cache, before):
        """h [B, s, dim] fp32 through blocks with absorbed attention over their caches, the MoE blocks over
        masked layouts; the s tokens of sequence b sit at positions before[b] ..."""
        m, s = self.model, h.shape[1]
        positions = (before[:, None] + torch.arange(s, device=before.device)).long()     # [B, s]
        positions = positions.clamp(max=m.rope_cos.shape[0] - 1)  # (only a finished speculative sequence passes it)
        cos, sin = m.rope_cos[positions], m.rope_sin[positions]                         # [B, s, rope / 2]
        if self.attention == "absorb":
            md = mla.get_mla_metadata(before + s, cache.block_table, cache.num_pages, s, self.args.n_heads,
                                      backend=self.backend)
        moes = m.moe_layers()
        for moe in moes:
            moe.masked = True
        try:
            for block, kv, wkv_b in zip(blocks, caches, wkv_bs):
                if self.attention == "absorb":
                    attend = self._absorbed_attention(block.attn, wkv_b, kv, cache, before, md, cos, sin)
                else:
                    attend = self._naive_attention(block.attn, kv, before, cos, sin)
                h = block(h, cos, sin, attend=attend)
        finally:
            for moe in moes:
                moe.masked = False
        return h

    @torch.no_grad()
    def decode(self, cache: PagedCache, tokens: torch.Tensor, return_hidden: bool = False):
        """tokens [B] or [B, s] (each sequence's next tokens) -> logits [B, vocab] or [B, s, vocab] fp32 of
        the positions after them (and the last block's output [B, s, dim] fp32 when return_hidden)."""
        m = self.model
        t = tokens[:, None] if tokens.dim() == 1 else tokens
        h = self._blocks(m.layers, cache.caches, self.wkv_b, m.embed(t).float(), cache, cache.seqlens)
        cache.seqlens += t.shape[1]  # in place: a captured step advances the lengths it reads
        logits = m.logits(h)
        logits = logits[:, 0] if tokens.dim() == 1 else logits
        return (logits, h) if return_hidden else logits

    def _mtp_input(self, h, next_tokens):
        mtp = self.model.mtp
        return mtp.proj(torch.cat([mtp.e_norm(self.model.embed(next_tokens).float()), mtp.h_norm(h)], dim=-1)).float()

    def _draft(self, cache, hidden, tokens):
        """The MTP module at the last two positions n - 2, n - 1 of each sequence (their main hidden states
        hidden [B, 2, dim] and the tokens after them [B, 2]): its cache rewritten there, and its guess of
        token n + 1 [B]."""
        m = self.model
        before = cache.mtp_seqlens
        h = self._blocks([m.mtp.block], [cache.mtp_cache], [self.mtp_wkv_b], self._mtp_input(hidden, tokens), cache,
                         before)
        cache.mtp_seqlens += 2
        return m.head(m.mtp.norm(h[:, -1])).float().argmax(dim=-1)

    @torch.no_grad()
    def generate_speculative(self, prompts, max_new_tokens: int):
        """Greedy decoding that drafts one token ahead with the MTP module and verifies it with the main
        model in the same step (two tokens a sequence): the tokens of plain greedy decoding, up to
        rounding, at one or two tokens a step. Prompts of at least two tokens. Returns (B lists of
        max_new_tokens ids, the fraction of drafts accepted)."""
        if self.model.mtp is None:
            raise ValueError("speculative decoding drafts with the MTP module: the model has none (mtp_depth 0)")
        if prompts and min(len(p) for p in prompts) < 2:
            raise ValueError("speculative decoding needs prompts of at least 2 tokens")
        device = self.model.rope_cos.device
        # A sequence that keeps accepting runs ahead of the slowest one (up to two tokens a step) while the
        # batch steps on: its cache holds the worst case, 2 * max_new_tokens + 2 rows past the prompt;
        # max_seq_len bounds what is returned (positions past it, on tokens then dropped, rotate as its last).
        cache = self._cache(prompts, max_new_tokens + 2, rows=2 * max_new_tokens + 2)
        logits, hidden = self.prefill(cache, prompts, mtp=True)
        t = logits.argmax(dim=-1)                                     # token n, committed, not yet fed
        state = {"hidden": hidden, "t": t, "prev": torch.tensor([p[-1] for p in prompts], device=device),  # n - 1
                 "emit": torch.zeros(len(prompts), 3, dtype=torch.long, device=device)}
        step = Graphed(lambda: self._speculative_step(cache, state), self.cuda_graph)
        out, drafted, accepted = [[int(x)] for x in t], 0, 0
        while min(len(o) for o in out) < max_new_tokens:
            step()
            for b, (first, second, ok) in enumerate(state["emit"].tolist()):
                out[b] += [first, second] if ok else [first]
                drafted, accepted = drafted + 1, accepted + ok
        return [o[:max_new_tokens] for o in out], accepted / max(drafted, 1)

    @torch.no_grad()
    def _speculative_step(self, cache, state):
        """One draft-and-verify step on the tensors of state, in place (a CUDA graph replays it): the MTP
        module drafts token n + 1 from hidden [B, 2, dim] and (prev, t) = tokens n - 1, n; the main model
        decodes t and the draft (positions n, n + 1). emit [B, 3] gets (the token at n + 1, the one at
        n + 2, whether the draft was accepted, in which case both are committed)."""
        hidden, t, prev = state["hidden"], state["t"], state["prev"]
        d = self._draft(cache, hidden, torch.stack([prev, t], dim=1))
        logits, h = self.decode(cache, torch.stack([t, d], dim=1), return_hidden=True)
        a, nxt = logits[:, 0].argmax(dim=-1), logits[:, 1].argmax(dim=-1)
        ok = a == d
        # accepted: n + 2 tokens committed; rejected: n + 1, the draft's row in the main cache dropped, and
        # the next draft writes the MTP module's rows n - 1 (again, from the same inputs) and n
        rejected = (~ok).int()
        cache.seqlens -= rejected
        cache.mtp_seqlens -= rejected
        state["emit"].copy_(torch.stack([a, nxt, ok.long()], dim=1))
        hidden.copy_(torch.where(ok[:, None, None], h, torch.stack([hidden[:, 1], h[:, 0]], dim=1)))
        prev.copy_(torch.where(ok, d, t))
        t.copy_(torch.where(ok, nxt, a))

    def _cache(self, prompts, extra, rows=None):
        """A cache for the prompts and `extra` tokens past the longest (rows: allocate that many instead)."""
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        longest = max(len(p) for p in prompts) + extra
        if longest > self.args.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens must be at most max_seq_len = {self.args.max_seq_len}, "
                             f"got {longest}")
        size = max(len(p) for p in prompts) + (extra if rows is None else rows)
        return PagedCache(self.model, len(prompts), size, self.model.rope_cos.device, self.attention)

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        """B prompts (lists of token ids) -> B lists of max_new_tokens new ids; temperature 0 is greedy."""
        cache = self._cache(prompts, max_new_tokens)
        g = torch.Generator(device=self.model.rope_cos.device).manual_seed(seed)
        logits, out = self.prefill(cache, prompts)[0], []
        tokens = torch.zeros(len(prompts), dtype=torch.long, device=logits.device)
        step = Graphed(lambda: self.decode(cache, tokens), self.cuda_graph)
        for i in range(max_new_tokens):
            out.append(sample(logits, temperature, top_p, g))
            if i + 1 < max_new_tokens:
                tokens.copy_(out[-1])
                logits = step()
        return torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]


class Graphed:
    """fn() (no arguments: it reads and writes fixed tensors) run eagerly on the first call, which compiles
    and initializes what it launches, captured as a CUDA graph on the second and replayed from then on;
    returns fn's output (the graph's own tensors, overwritten by the next replay). enabled=False: eager
    every call."""

    def __init__(self, fn, enabled: bool):
        self.fn, self.enabled, self.calls, self.graph, self.out = fn, enabled, 0, None, None

    def __call__(self):
        self.calls += 1
        if not self.enabled or self.calls == 1:
            return self.fn()
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.fn()
            self.graph = graph  # (only once captured whole: a capture that raised is not replayed)
        self.graph.replay()
        return self.out


def sample(logits, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [B, V] -> tokens [B]: argmax at temperature 0, else from softmax(logits / temperature) cut to
    the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # keeps the token that reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def bf16_weights(model: Transformer) -> Transformer:
    """A BF16 model made for serving, in place: every GEMM's weight (each Linear's, the experts') cast to
    bf16 once, so that a decode step reads two bytes a weight instead of rounding the fp32 master in every
    call (the norms, the gate and the embedding keep theirs). The logits are the same bit for bit; train
    no further on it."""
    if model.args.precision != "bf16":
        raise ValueError(f"bf16_weights: the model's precision must be 'bf16', got {model.args.precision!r}")
    gate = {id(moe.gate.weight) for moe in model.moe_layers()}
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not name.startswith("embed") and id(p) not in gate:
            p.data = p.data.to(BF16)
    return model


def load(path: str, device) -> Transformer:
    """A model from model.train's checkpoint, on device (the reference backends on a CPU)."""
    state = torch.load(path, map_location=device, weights_only=False)
    fields = dict(state["args"], backend=backend_for(device))
    model = Transformer(ModelArgs(**fields)).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="a model.train checkpoint (ckpt.pt); without it or --deepseek, an untrained "
                                  "--preset")
    p.add_argument("--deepseek", help="a directory in DeepSeek-V3's released format (config.json, safetensors)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompt", action="append", help="repeat for a batch (default: 'def ')")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true", help="greedy, drafting with the MTP module")
    p.add_argument("--attention", choices=ATTENTION, default="absorb",
                   help="absorb: the latent cache and dskernels.mla; naive: per-head K and V cached (the baseline)")
    p.add_argument("--no-cuda-graph", action="store_true", help="launch every decode step eagerly")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.deepseek:
        from model.deepseek import load_deepseek
        model = load_deepseek(a.deepseek, device=a.device)
    elif a.ckpt:
        model = load(a.ckpt, a.device)
    else:
        model = Transformer(preset(a.preset, backend=backend_for(a.device))).to(a.device).eval()
    prompts = a.prompt or ["def "]
    ids = [data.encode(t).tolist() for t in prompts]
    gen = Generator(model, attention=a.attention, cuda_graph=False if a.no_cuda_graph else None)
    if a.speculative:
        outs, rate = gen.generate_speculative(ids, a.max_new_tokens)
        print(f"MTP drafts accepted: {rate:.1%}", file=sys.stderr)
    else:
        outs = gen.generate(ids, a.max_new_tokens, a.temperature, a.top_p, a.seed)
    for text, new in zip(prompts, outs):
        print(text + data.decode(new), file=sys.stdout)
        print("-" * 40)


if __name__ == "__main__":
    main()
