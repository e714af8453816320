"""Generate with the reference model: python -m model.generate --ckpt runs/tiny-bf16/ckpt.pt --prompt "def "
(or --deepseek DIR: a checkpoint in DeepSeek-V3's released format, model.deepseek).

Prefill runs each prompt through the training forward (full attention over its tokens) and writes every
layer's kv latent c and rotated RoPE key into that layer's paged cache (dskernels.mla.append_to_cache).
A decode step never forms k or v: the query's non-RoPE part is absorbed into the latent space
(q_nope W_UK, dskernels.mla.absorb_query), attention runs over the cached [c | k_rope] rows
(dskernels.mla.mla_decode, one metadata for all layers per step), and its output leaves the latent space
through W_UV (absorb_output) before wo; the MoE layers run over masked layouts (the masked grouped
GEMMs). A ragged batch decodes together, each sequence at its own position.
"""
import argparse
import sys

import torch

from dskernels import mla
from model import data
from model.config import ModelArgs, preset
from model.model import BF16, Transformer, apply_rope

PAGE = 64  # tokens per cache page (dskernels.mla's)


def check_decodable(args: ModelArgs):
    dims = (args.kv_lora_rank, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim)
    if dims != (512, 128, 64, 128):
        raise ValueError(f"the absorbed decode takes DeepSeek-V3's head dims (kv_lora_rank, qk_nope_head_dim, "
                         f"qk_rope_head_dim, v_head_dim) = (512, 128, 64, 128), got {dims}")


class PagedCache:
    """One paged latent cache per block, [num_pages, 64, 1, 576] bf16, sharing one block table (sequence b
    owns pages b * pages_per_seq ...) and cache_seqlens [B] int32."""

    def __init__(self, model: Transformer, batch: int, max_len: int, device):
        pages = -(-max_len // PAGE)
        self.num_pages = batch * pages
        self.block_table = torch.arange(self.num_pages, dtype=torch.int32, device=device).view(batch, pages)
        width = model.args.kv_lora_rank + model.args.qk_rope_head_dim
        self.caches = [torch.zeros(self.num_pages, PAGE, 1, width, dtype=BF16, device=device) for _ in model.layers]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)


class Generator:
    """Prefill and absorbed decode for a Transformer (its weights as they are: call again after training)."""

    def __init__(self, model: Transformer):
        check_decodable(model.args)
        self.model, self.args = model, model.args
        self.wkv_b = [layer.attn.wkv_b.weight.to(BF16) for layer in model.layers]  # [H * 256, 512] each

    @torch.no_grad()
    def prefill(self, cache: PagedCache, prompts) -> torch.Tensor:
        """prompts: B lists of token ids (non-empty) -> logits [B, vocab] fp32 of each prompt's last token."""
        m, out = self.model, []
        for b, prompt in enumerate(prompts):
            tokens = torch.tensor([prompt], dtype=torch.long, device=cache.seqlens.device)
            h = m.embed(tokens).float()
            for layer, kv in zip(m.layers, cache.caches):
                def attend(x, cos, sin, attn=layer.attn, kv=kv):
                    o, c, k_rope = attn.forward_with_latent(x, cos, sin)
                    mla.append_to_cache(kv, cache.block_table[b:b + 1], cache.seqlens[b:b + 1], c.to(BF16),
                                        k_rope[:, :, 0].to(BF16), backend=self._backend())
                    return o
                h = layer(h, m.rope_cos, m.rope_sin, attend=attend)
            out.append(m.logits(h)[:, -1])
            cache.seqlens[b] = len(prompt)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, cache: PagedCache, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (each sequence's next token) -> logits [B, vocab] fp32 of the position after it."""
        m, a = self.model, self.args
        before = cache.seqlens
        after = before + 1
        cos, sin = m.rope_cos[before.long()][:, None], m.rope_sin[before.long()][:, None]  # [B, 1, rope / 2]
        md = mla.get_mla_metadata(after, cache.block_table, cache.num_pages, 1, a.n_heads, backend=self._backend())
        h = m.embed(tokens[:, None]).float()
        moes = m.moe_layers()
        for moe in moes:
            moe.masked = True
        try:
            for layer, kv, wkv_b in zip(m.layers, cache.caches, self.wkv_b):
                def attend(x, _cos, _sin, attn=layer.attn, kv=kv, wkv_b=wkv_b):
                    q_nope, q_rope = attn.query(x)                                   # [B, 1, H, 128], [..., 64]
                    c, k_rope = attn.latent(x)
                    q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
                    mla.append_to_cache(kv, cache.block_table, before, c.to(BF16), k_rope[:, :, 0].to(BF16),
                                        backend=self._backend())
                    q = torch.cat([mla.absorb_query(q_nope.to(BF16), wkv_b), q_rope.to(BF16)], dim=-1)
                    o, _ = mla.mla_decode(q, kv, cache.block_table, after, a.softmax_scale(), metadata=md,
                                          backend=self._backend())
                    o = mla.absorb_output(o, wkv_b)                                  # [B, 1, H, 128]
                    return attn.wo(o.reshape(*o.shape[:2], a.n_heads * a.v_head_dim))
                h = layer(h, cos, sin, attend=attend)
        finally:
            for moe in moes:
                moe.masked = False
        cache.seqlens = after
        return m.logits(h)[:, -1]

    def _backend(self):
        return "reference" if self.args.backend == "reference" else "auto"

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        """B prompts (lists of token ids) -> B lists of max_new_tokens new ids; temperature 0 is greedy."""
        device = self.model.rope_cos.device
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.args.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens must be at most max_seq_len = {self.args.max_seq_len}, "
                             f"got {longest}")
        cache = PagedCache(self.model, len(prompts), longest, device)
        g = torch.Generator(device=device).manual_seed(seed)
        logits, out = self.prefill(cache, prompts), []
        for _ in range(max_new_tokens):
            tokens = sample(logits, temperature, top_p, g)
            out.append(tokens)
            logits = self.decode(cache, tokens)
        return torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]


def sample(logits, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [B, V] -> tokens [B]: argmax at temperature 0, else from softmax(logits / temperature) cut to
    the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keeps the token that crosses top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def load(path: str, device) -> Transformer:
    """A model from model.train's checkpoint, on device (the reference backends on a CPU)."""
    state = torch.load(path, map_location=device, weights_only=False)
    fields = dict(state["args"], backend="auto" if torch.device(device).type == "cuda" else "reference")
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.deepseek:
        from model.deepseek import load_deepseek
        model = load_deepseek(a.deepseek, device=a.device)
    elif a.ckpt:
        model = load(a.ckpt, a.device)
    else:
        backend = "auto" if torch.device(a.device).type == "cuda" else "reference"
        model = Transformer(preset(a.preset, backend=backend)).to(a.device).eval()
    prompts = a.prompt or ["def "]
    outs = Generator(model).generate([data.encode(t).tolist() for t in prompts], a.max_new_tokens, a.temperature,
                                     a.top_p, a.seed)
    for text, new in zip(prompts, outs):
        print(text + data.decode(new), file=sys.stdout)
        print("-" * 40)


if __name__ == "__main__":
    main()
