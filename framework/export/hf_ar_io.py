"""A released autoregressive transformers checkpoint (`model_type` llama or qwen2), read into our LladaModel.

A local folder as `save_pretrained` writes it: `config.json` and the weights in one `model.safetensors` or in
shards listed by `model.safetensors.index.json`. Both families are our block exactly: pre-norm RMSNorm,
rotate-half RoPE, SwiGLU, grouped-query attention; Qwen2 adds biases to q/k/v (our `qkv_bias`). So the import is
a key rename plus a config mapping, and with `model.causal=true` our logits are transformers' own. A config field
that would change the maths without our model following it (a RoPE scaling, sliding-window attention, biases
elsewhere, another activation or head size, quantised weights) is refused with the field named, never ignored.

The mask token of masked diffusion is the tokenizer's business (recipes/llada/tokenizer.py); this module only
reads shapes and weights. Reading needs no transformers import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from framework.export.llada_io import INDEX, SINGLE, weight_files
from framework.nn.llada import LladaModelConfig

MODEL_TYPES = ("llama", "qwen2")

# our key (blocks.N. stripped) -> theirs (model.layers.N. stripped)
BLOCK_KEYS = {"attn_norm.weight": "input_layernorm.weight", "attn.wq.weight": "self_attn.q_proj.weight",
              "attn.wk.weight": "self_attn.k_proj.weight", "attn.wv.weight": "self_attn.v_proj.weight",
              "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
              "attn.wv.bias": "self_attn.v_proj.bias", "attn.wo.weight": "self_attn.o_proj.weight",
              "ffn_norm.weight": "post_attention_layernorm.weight", "ffn.w1.weight": "mlp.gate_proj.weight",
              "ffn.w3.weight": "mlp.up_proj.weight", "ffn.w2.weight": "mlp.down_proj.weight"}
TOP_KEYS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}
# Older checkpoints saved RoPE's inverse frequencies as buffers: recomputed here from rope_theta.
DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def read_raw_config(folder: str | Path) -> dict | None:
    """The folder's config.json when its model_type is one we import, else None."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) and raw.get("model_type") in MODEL_TYPES else None


def is_ar_folder(path: str | Path) -> bool:
    """A transformers Llama or Qwen2 folder (config.json model_type llama / qwen2)."""
    return read_raw_config(path) is not None


def rope_settings(raw: dict) -> tuple[str, float, float]:
    """(rope type, theta, partial rotary factor) from either spelling: transformers 5 writes `rope_parameters`,
    earlier versions a top-level `rope_theta` and `rope_scaling` (None when unscaled)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        params = {}
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    return str(kind), float(theta), float(partial)


def refusals(raw: dict) -> list[str]:
    """Each config field whose value our model would not compute, as 'field=value (why)'."""
    kind, _, partial = rope_settings(raw)
    field = "rope_parameters.rope_type" if raw.get("rope_parameters") else "rope_scaling"
    out = []
    if kind != "default":
        out.append(f"{field}={kind!r} (only unscaled RoPE is implemented)")
    if partial != 1.0:
        out.append(f"partial_rotary_factor={partial} (RoPE rotates the whole head here)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        out.append(f"hidden_act={act!r} (SwiGLU with silu only)")
    heads, dim = raw.get("num_attention_heads"), raw.get("hidden_size")
    head_dim = raw.get("head_dim")
    if head_dim is not None and heads and dim and head_dim * heads != dim:
        out.append(f"head_dim={head_dim} (must be hidden_size / num_attention_heads = {dim // heads})")
    if raw.get("model_type") == "llama" and raw.get("attention_bias"):
        out.append("attention_bias=True (Llama's puts a bias on o_proj too; only q/k/v biases are implemented)")
    if raw.get("mlp_bias"):
        out.append("mlp_bias=True (the feed-forward has no biases here)")
    if raw.get("use_sliding_window"):
        out.append("use_sliding_window=True (attention is over the whole sequence here)")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        out.append(f"layer_types={sorted(set(layer_types))} (only full_attention layers)")
    if raw.get("attention_dropout"):
        out.append(f"attention_dropout={raw['attention_dropout']} (the model has no dropout)")
    if raw.get("quantization_config"):
        out.append("quantization_config (quantised weights; import the full-precision checkpoint)")
    return out


def model_fields(raw: dict, source: str | Path = "config.json") -> dict:
    """Our LladaModelConfig fields that shape the weights (plus max_seq_len), from a Llama / Qwen2 config.json;
    ValueError naming the field for what our model cannot represent. The mask id is not among them: the
    tokenizer decides it (recipes/llada/tokenizer.py)."""
    bad = refusals(raw)
    if bad:
        raise ValueError(f"{source}: cannot import this {raw.get('model_type')} variant: {'; '.join(bad)}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}")
    _, theta, _ = rope_settings(raw)
    return {"vocab_size": raw["vocab_size"], "dim": raw["hidden_size"], "n_layers": raw["num_hidden_layers"],
            "n_heads": raw["num_attention_heads"],
            "n_kv_heads": raw.get("num_key_value_heads") or raw["num_attention_heads"],
            "ffn_hidden": raw["intermediate_size"], "rope_theta": theta,
            "norm_eps": float(raw.get("rms_norm_eps", 1e-6)), "qk_norm": False,
            # Qwen2's attention always has q/k/v biases (transformers hard-codes them); Llama's none here
            "qkv_bias": raw["model_type"] == "qwen2",
            # both families default to untied when the key is absent (LlamaConfig, Qwen2Config)
            "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
            "max_seq_len": int(raw.get("max_position_embeddings", 4096))}


def our_key(theirs: str) -> str | None:
    """Our state-dict key for a transformers key, None if it has no counterpart."""
    block = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", theirs)
    if block:
        ours = {v: k for k, v in BLOCK_KEYS.items()}.get(block.group(2))
        return f"blocks.{block.group(1)}.{ours}" if ours else None
    return {v: k for k, v in TOP_KEYS.items()}.get(theirs)


def read(folder: str | Path) -> tuple[dict[str, torch.Tensor], LladaModelConfig]:
    """(state dict with our keys in the file's dtype, our model config: causal False, the default mask id)."""
    d = Path(folder)
    raw = read_raw_config(d)
    if raw is None:
        raise ValueError(f"{d / 'config.json'}: not a transformers {' or '.join(MODEL_TYPES)} config")
    cfg = LladaModelConfig(**model_fields(raw, d / "config.json"))
    files = weight_files(d)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(files.values())):
        path = d / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {INDEX} but missing")
        for key, tensor in load_file(path).items():
            if DERIVED.fullmatch(key):
                continue
            ours = our_key(key)
            if ours is None:
                raise ValueError(f"{path}: key {key} has no counterpart in our model")
            state[ours] = tensor
    if cfg.tie_embeddings:  # save_pretrained leaves the tied head out; our module names the matrix twice
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    elif "lm_head.weight" not in state:
        raise ValueError(f"{d}: tie_word_embeddings is false but no lm_head.weight in {SINGLE} or {INDEX}")
    return state, cfg


def grow_vocab(state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The embedding (and an untied head) extended to `rows` rows, each new row the mean of the existing ones.

    Why the mean: a new token's input embedding then sits inside the cloud of real ones (no outlier norm for the
    first layers), and its output row gives the average token's logit rather than a random spike, so adding the
    mask token changes neither the inputs nor the predictions of the imported model at the first step."""
    out = dict(state)
    for key in ("embed.weight", "lm_head.weight"):
        weight = state[key]
        extra = rows - weight.shape[0]
        if extra < 0:
            raise ValueError(f"{key}: {weight.shape[0]} rows, cannot shrink to {rows}")
        if extra:
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
            out[key] = torch.cat([weight, mean.expand(extra, -1)])
    if state["lm_head.weight"] is state["embed.weight"]:  # tied: one matrix under both names
        out["lm_head.weight"] = out["embed.weight"]
    return out
