"""DeepSeek-V3's released checkpoint format, read and written: a directory of safetensors shards beside a
config.json, Hugging Face parameter names (model.layers.{i}.self_attn.q_a_proj.weight, ...; the MTP
module as layer n_layers), every Linear weight of attention and the FFNs in e4m3 with `<name>_scale_inv`
fp32 [ceil(N / 128), ceil(K / 128)] beside it (weight = e4m3 * scale_inv per 128 x 128 block), the rest
in bf16 (embedding, norms, gate, head) or fp32 (the gate's e_score_correction_bias).

    model = load_deepseek("DeepSeek-V3-dir", device="cuda")   # fp32 master weights, ready to generate
    save_deepseek(model, "out-dir")                           # what load_deepseek reads (tests, export)

A routed expert's gate_proj and up_proj stack into one row of this model's w13, its down_proj into w2.
"""
import json
import os

import torch

from dskernels import dequant, per_block_quant
from model.config import ModelArgs, backend_for
from model.model import Transformer

_ATTN = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wq": "q_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_DENSE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_MTP = {"e_norm": "enorm", "h_norm": "hnorm", "proj": "eh_proj", "norm": "shared_head.norm"}


def _block_names(prefix, theirs, block):
    """(our name, [their names]) of one Block's tensors; a list of two is stacked along dim 0 (w13)."""
    out = [(f"{prefix}.{o}.weight", [f"{theirs}.{t}.weight"]) for o, t in _NORMS.items()]
    out += [(f"{prefix}.attn.{o}.weight", [f"{theirs}.self_attn.{t}.weight"]) for o, t in _ATTN.items()
            if hasattr(block.attn, o)]
    ffn = block.ffn
    if hasattr(ffn, "w13"):  # MoE
        out.append((f"{prefix}.ffn.gate.weight", [f"{theirs}.mlp.gate.weight"]))
        out.append((f"{prefix}.ffn.bias", [f"{theirs}.mlp.gate.e_score_correction_bias"]))
        for e in range(ffn.w13.shape[0]):
            x = f"{theirs}.mlp.experts.{e}"
            out.append((f"{prefix}.ffn.w13.{e}", [f"{x}.gate_proj.weight", f"{x}.up_proj.weight"]))
            out.append((f"{prefix}.ffn.w2.{e}", [f"{x}.down_proj.weight"]))
        if ffn.shared is not None:
            x = f"{theirs}.mlp.shared_experts"
            out.append((f"{prefix}.ffn.shared.w13.weight", [f"{x}.gate_proj.weight", f"{x}.up_proj.weight"]))
            out.append((f"{prefix}.ffn.shared.w2.weight", [f"{x}.down_proj.weight"]))
    else:
        out += [(f"{prefix}.ffn.{o}.weight", [f"{theirs}.mlp.{t}.weight"]) for o, t in _DENSE.items()]
    return out


def names(model: Transformer):
    """Every tensor of the model as (our state_dict name, or name.e for expert e of w13 / w2; [their names])."""
    out = [("embed.weight", ["model.embed_tokens.weight"]), ("norm.weight", ["model.norm.weight"]),
           ("head.weight", ["lm_head.weight"])]
    for i, block in enumerate(model.layers):
        out += _block_names(f"layers.{i}", f"model.layers.{i}", block)
    if model.mtp is not None:
        n = f"model.layers.{model.args.n_layers}"
        out += [(f"mtp.{o}.weight", [f"{n}.{t}.weight"]) for o, t in _MTP.items()]
        out += _block_names("mtp.block", n, model.mtp.block)
    return out


def _fp8(name: str) -> bool:
    """Their Linear weights of attention and the FFNs are e4m3 (norms, the gate and the head are not)."""
    return name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def save_deepseek(model: Transformer, path: str, shard_tensors: int = 400):
    """Writes model in DeepSeek-V3's format into directory path (config.json and model-*.safetensors)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    state, tensors = model.state_dict(), {}
    for ours, theirs in names(model):
        base, _, expert = ours.rpartition(".") if ours.split(".")[-1].isdigit() else (ours, "", "")
        w = state[base][int(expert)] if expert else state[base]
        parts = w.chunk(len(theirs), dim=0) if len(theirs) > 1 else [w]
        for name, t in zip(theirs, parts):
            t = t.detach().float().cpu().contiguous()
            if _fp8(name):
                q, s = per_block_quant(t, backend="reference")
                tensors[name], tensors[name + "_scale_inv"] = q, s
            else:
                tensors[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    keys = sorted(tensors)
    shards = [keys[i:i + shard_tensors] for i in range(0, len(keys), shard_tensors)]
    for k, shard in enumerate(shards):
        save_file({n: tensors[n] for n in shard}, os.path.join(path, f"model-{k + 1:05d}-of-{len(shards):05d}"
                                                                     f".safetensors"))
    config = model.args.to_config_json()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def load_deepseek(path: str, device="cpu", **overrides) -> Transformer:
    """A Transformer from a DeepSeek-V3-format directory: fp32 weights (e4m3 ones dequantized per block) on
    device; overrides go to ModelArgs (precision, backend, max_seq_len, ...)."""
    from safetensors import safe_open
    defaults = {"backend": backend_for(device)}
    args = ModelArgs.from_config_json(os.path.join(path, "config.json"), **{**defaults, **overrides})
    model = Transformer(args)
    handles = [safe_open(os.path.join(path, f), "pt") for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    where = {k: h for h in handles for k in h.keys()}

    def read(name):
        if name not in where:
            raise ValueError(f"the checkpoint at {path} has no tensor {name}")
        t = where[name].get_tensor(name)
        if name + "_scale_inv" in where:
            t = dequant(t, where[name + "_scale_inv"].get_tensor(name + "_scale_inv"), block_shape=(128, 128),
                        out_dtype=torch.float32, backend="reference")
        return t.float()
    state = model.state_dict()
    with torch.no_grad():
        for ours, theirs in names(model):
            w = torch.cat([read(t) for t in theirs], dim=0)
            base, _, expert = ours.rpartition(".") if ours.split(".")[-1].isdigit() else (ours, "", "")
            dst = state[base][int(expert)] if expert else state[base]
            if tuple(dst.shape) != tuple(w.shape):
                raise ValueError(f"{theirs[0]} must be {tuple(dst.shape)} for this config, got {tuple(w.shape)}")
            dst.copy_(w)
    return model.to(device).eval()
