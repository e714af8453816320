"""The model's arguments: one dataclass, DeepSeek-V3's names (its inference code's ModelArgs), and the presets.

    args = PRESETS["tiny"]                       # or ModelArgs.from_config_json("config.json")
    args = dataclasses.replace(args, precision="fp8")

The kernels set the divisibility rules `check()` enforces: every Linear that runs in FP8 reduces over
a multiple of 128 (dim, q_lora_rank, kv_lora_rank, n_heads * v_head_dim, the FFN widths), and the
experts' intermediate size is a multiple of 128.
"""
import dataclasses
import json
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelArgs:
    # --- sizes
    vocab_size: int = 256              # tokens (the byte-level tokenizer's 256 bytes)
    dim: int = 128                     # hidden size
    inter_dim: int = 256               # the dense layers' SwiGLU width
    moe_inter_dim: int = 128           # each routed (and shared) expert's SwiGLU width
    n_layers: int = 2                  # transformer blocks of the main model
    n_dense_layers: int = 1            # the first blocks use a dense FFN, the rest MoE
    n_heads: int = 2                   # attention heads
    # --- MoE
    n_routed_experts: int = 8          # fine-grained routed experts per MoE layer
    n_shared_experts: int = 1          # always-on experts (one SwiGLU of n_shared_experts * moe_inter_dim)
    n_activated_experts: int = 2       # routed experts per token (top-k)
    n_expert_groups: int = 4           # groups the experts are split into for group-limited routing
    n_limited_groups: int = 2          # groups a token may route into
    score_func: str = "sigmoid"        # routing affinities: "sigmoid" (V3) or "softmax" (V2)
    route_scale: float = 1.0           # the normalized routing weights are multiplied by this
    bias_update_speed: float = 0.001   # gamma of the auxiliary-loss-free balancing (0: no balancing)
    seq_aux_loss_alpha: float = 0.0    # weight of the sequence-wise balance loss (V3: 1e-4; 0: off)
    # --- MLA
    # (dskernels.mla's absorbed decode takes DeepSeek-V3's head dims, the defaults: 512, 128, 64, 128)
    q_lora_rank: int = 128             # query compression rank (0: no compression, a plain projection)
    kv_lora_rank: int = 512            # the latent KV's rank: what the decode cache keeps per token
    qk_nope_head_dim: int = 128        # per-head query/key dims without rotary embedding
    qk_rope_head_dim: int = 64         # per-head dims with the decoupled rotary embedding (shared key)
    v_head_dim: int = 128              # per-head value dims
    # --- positions (RoPE, YaRN past original_seq_len)
    max_seq_len: int = 128             # the longest sequence trained or generated
    original_seq_len: int = 4096       # the pretraining context; YaRN stretches beyond it
    rope_theta: float = 10000.0        # RoPE base
    rope_factor: float = 1.0           # YaRN's stretch factor (1: plain RoPE)
    beta_fast: int = 32                # YaRN: rotations above this many per context keep their frequency
    beta_slow: int = 1                 # YaRN: rotations below this many are interpolated fully
    mscale: float = 1.0                # YaRN's attention temperature coefficient
    # --- multi-token prediction
    mtp_depth: int = 1                 # extra tokens predicted (0: off; the code supports 1)
    mtp_loss_weight: float = 0.3       # lambda of the MTP loss (V3: 0.3 early, 0.1 late)
    # --- numerics
    norm_eps: float = 1e-6             # RMSNorm epsilon
    precision: str = "bf16"            # "bf16", or "fp8": DeepSeek-V3's recipe for every Linear and expert
    backend: str = "auto"              # dskernels backend for the kernels ("reference" on a CPU)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def softmax_scale(self) -> float:
        """1/sqrt(head dim), times YaRN's temperature squared when the context is stretched."""
        scale = self.qk_head_dim ** -0.5
        if self.max_seq_len > self.original_seq_len and self.rope_factor > 1:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def check(self) -> "ModelArgs":
        """Raises naming the field whose value the kernels cannot take."""
        if self.precision not in ("bf16", "fp8"):
            raise ValueError(f"precision must be 'bf16' or 'fp8', got {self.precision!r}")
        rules = {"dim": self.dim, "kv_lora_rank": self.kv_lora_rank, "n_heads * v_head_dim":
                 self.n_heads * self.v_head_dim, "inter_dim": self.inter_dim, "moe_inter_dim": self.moe_inter_dim}
        if self.q_lora_rank:
            rules["q_lora_rank"] = self.q_lora_rank
        for name, value in rules.items():
            if value % 128:
                raise ValueError(f"{name} must be a multiple of 128 (the FP8 GEMMs and the MoE layer reduce "
                                 f"over it in 128 blocks), got {value}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"n_dense_layers must be in [0, n_layers = {self.n_layers}], got {self.n_dense_layers}")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError(f"n_expert_groups must divide n_routed_experts = {self.n_routed_experts}, got "
                             f"{self.n_expert_groups}")
        if self.mtp_depth not in (0, 1):
            raise ValueError(f"mtp_depth must be 0 or 1, got {self.mtp_depth}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (rotations act on pairs), got {self.qk_rope_head_dim}")
        return self

    @classmethod
    def from_config_json(cls, path: str, **overrides) -> "ModelArgs":
        """A DeepSeek-V3 (Hugging Face) config.json's fields under this class's names."""
        with open(path) as f:
            c = json.load(f)
        rope = c.get("rope_scaling") or {}
        fields = {ours: c[theirs] for ours, theirs in HF_FIELDS if theirs in c}
        fields.update({ours: rope[theirs] for ours, theirs in HF_ROPE_FIELDS if theirs in rope})
        fields["q_lora_rank"] = fields.get("q_lora_rank") or 0
        fields["original_seq_len"] = rope.get("original_max_position_embeddings", fields.get("max_seq_len", 4096))
        fields["mtp_depth"] = min(1, c.get("num_nextn_predict_layers", 0))
        fields.update(overrides)
        return cls(**fields)

    def to_config_json(self) -> dict:
        """This model's config.json in DeepSeek-V3's (Hugging Face) names."""
        c = {theirs: getattr(self, ours) for ours, theirs in HF_FIELDS}
        c["rope_scaling"] = {theirs: getattr(self, ours) for ours, theirs in HF_ROPE_FIELDS}
        c["rope_scaling"].update(original_max_position_embeddings=self.original_seq_len, type="yarn")
        c["num_nextn_predict_layers"] = self.mtp_depth
        return c


# (ours, config.json's): the fields a DeepSeek-V3 config.json names directly
HF_FIELDS = [("vocab_size", "vocab_size"), ("dim", "hidden_size"), ("inter_dim", "intermediate_size"),
             ("moe_inter_dim", "moe_intermediate_size"), ("n_layers", "num_hidden_layers"),
             ("n_dense_layers", "first_k_dense_replace"), ("n_heads", "num_attention_heads"),
             ("n_routed_experts", "n_routed_experts"), ("n_shared_experts", "n_shared_experts"),
             ("n_activated_experts", "num_experts_per_tok"), ("n_expert_groups", "n_group"),
             ("n_limited_groups", "topk_group"), ("score_func", "scoring_func"),
             ("route_scale", "routed_scaling_factor"), ("q_lora_rank", "q_lora_rank"),
             ("kv_lora_rank", "kv_lora_rank"), ("qk_nope_head_dim", "qk_nope_head_dim"),
             ("qk_rope_head_dim", "qk_rope_head_dim"), ("v_head_dim", "v_head_dim"),
             ("max_seq_len", "max_position_embeddings"), ("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps")]
HF_ROPE_FIELDS = [("rope_factor", "factor"), ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                  ("mscale", "mscale")]


PRESETS = {
    # Trains on a 2-core CPU in about a minute with the reference backends, the loss visibly falling:
    # one dense and one MoE block of 8 experts (top-2 of 2 groups out of 4), 2048 tokens a step. Its
    # bias moves 10x faster than V3's 0.001, which balances over a long run, not over 300 steps.
    "tiny": ModelArgs(bias_update_speed=0.01),
    # One H200: 1000 steps of BF16 and 1000 of FP8 together in at most five minutes (the parity test).
    "small": ModelArgs(dim=256, inter_dim=512, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=4,
                       n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                       q_lora_rank=128, max_seq_len=256, bias_update_speed=0.005),
    # Where FP8 pays: every GEMM large enough that the tensor cores, not the launches, set the step's time
    # (hidden 3072, the experts 64 x 1024 top-6, 32768 tokens a step at sequence 4096: each expert sees
    # about 3000 rows), yet the whole model with fp32 master weights and AdamW fits one H200.
    "bench": ModelArgs(vocab_size=256, dim=3072, inter_dim=8192, moe_inter_dim=1024, n_layers=8,
                       n_dense_layers=2, n_heads=24, n_routed_experts=64, n_activated_experts=6,
                       n_expert_groups=8, n_limited_groups=4, route_scale=2.5, q_lora_rank=1024,
                       max_seq_len=4096),
    # DeepSeek-V3's own dimensions (671B): for shapes only.
    "v3": ModelArgs(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
                    n_dense_layers=3, n_heads=128, n_routed_experts=256, n_activated_experts=8, n_expert_groups=8,
                    n_limited_groups=4, route_scale=2.5, q_lora_rank=1536, max_seq_len=163840,
                    original_seq_len=4096, rope_factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0),
}


def backend_for(device) -> str:
    """The dskernels backend a model on device runs: the kernels ("auto") on a GPU, the reference on a CPU."""
    return "auto" if torch.device(device).type == "cuda" else "reference"


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return dataclasses.replace(PRESETS[name], **overrides).check()
