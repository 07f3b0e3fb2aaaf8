"""LLaDA's released checkpoint layout (GSAI-ML/LLaDA-8B-Base, -Instruct), read and written.

A folder holds `config.json` (`model_type: llada`: `d_model`, `n_layers`, `n_heads`, `n_kv_heads`,
`mlp_hidden_size`, `embedding_size`, `rope_theta`, `rms_norm_eps`, `mask_token_id`, `weight_tying`,
`block_type: llama`, ...), the weights in one `model.safetensors` or in shards listed by
`model.safetensors.index.json`, keys `model.transformer.*`, and the files tools built for the release need
(tokenizer, generation config, the modeling code loaded with trust_remote_code).

The architecture is a Llama block with bidirectional attention, i.e. our LladaModel: import and export are a
key rename (no permutation; both use rotate-half RoPE) plus a config mapping; `include_qkv_bias` is our
`qkv_bias` (an adapted Qwen2 exports with it). What does not map (other biases,
ALiBi, a LayerNorm, qk-norm across the full width, fused q/k/v) is refused with the config key named.
Reading needs no transformers import.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from framework.nn.llada import LladaModelConfig

MODEL_TYPE = "llada"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PREFIX = "model.transformer."

# our key (blocks.N. stripped) -> theirs (model.transformer.blocks.N. stripped)
BLOCK_KEYS = {"attn_norm.weight": "attn_norm.weight", "attn.wq.weight": "q_proj.weight",
              "attn.wk.weight": "k_proj.weight", "attn.wv.weight": "v_proj.weight",
              "attn.wo.weight": "attn_out.weight", "ffn_norm.weight": "ff_norm.weight",
              "ffn.w1.weight": "ff_proj.weight", "ffn.w3.weight": "up_proj.weight", "ffn.w2.weight": "ff_out.weight",
              # include_qkv_bias (our qkv_bias, e.g. an adapted Qwen2)
              "attn.wq.bias": "q_proj.bias", "attn.wk.bias": "k_proj.bias", "attn.wv.bias": "v_proj.bias"}
TOP_KEYS = {"embed.weight": "wte.weight", "norm.weight": "ln_f.weight", "lm_head.weight": "ff_out.weight"}

# config.json values a Llama block with bidirectional attention and our norms must have (key: accepted values)
REQUIRED = {"block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",),
            "include_bias": (False,), "bias_for_layer_norm": (False, None),
            "alibi": (False,), "rope": (True,), "attention_layer_norm": (False,), "input_emb_norm": (False,),
            "scale_logits": (False,), "clip_qkv": (None,), "multi_query_attention": (None, False),
            "layer_norm_with_affine": (True,)}

# Written when there is no source folder to copy config.json from: the release's architecture fields.
BASE_CONFIG = {"architectures": ["LLaDAModelLM"],
               "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                            "AutoModel": "modeling_llada.LLaDAModelLM",
                            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
               "model_type": MODEL_TYPE, "activation_type": "silu", "alibi": False, "attention_layer_norm": False,
               "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "include_bias": False,
               "include_qkv_bias": False, "input_emb_norm": False, "layer_norm_type": "rms",
               "layer_norm_with_affine": True, "multi_query_attention": None, "rope": True,
               "rope_full_precision": True, "scale_logits": False, "use_cache": False}


def our_key(theirs: str) -> str | None:
    """Our state-dict key for a LLaDA key, None if it has no counterpart."""
    if not theirs.startswith(PREFIX):
        return None
    rest = theirs[len(PREFIX):]
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if block:
        ours = {v: k for k, v in BLOCK_KEYS.items()}.get(block.group(2))
        return f"blocks.{block.group(1)}.{ours}" if ours else None
    return {v: k for k, v in TOP_KEYS.items()}.get(rest)


def their_key(ours: str) -> str:
    """The LLaDA key of one of our state-dict keys (KeyError for keys LLaDA has no place for)."""
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", ours)
    if block:
        return f"{PREFIX}blocks.{block.group(1)}.{BLOCK_KEYS[block.group(2)]}"
    return PREFIX + TOP_KEYS[ours]


def is_llada_folder(path: str | Path) -> bool:
    """A folder whose config.json says model_type llada (the released layout, not our `hf` export)."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError, OSError):
        return False


def read_raw_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path}: model_type is {raw.get('model_type') if isinstance(raw, dict) else None!r}, "
                         f"not {MODEL_TYPE!r}")
    return raw


def model_fields(raw: dict, source: str | Path = "config.json") -> dict:
    """Our LladaModelConfig fields that shape the weights, from a LLaDA config.json (ValueError naming the key
    for what our model cannot represent). A padded embedding_size > vocab_size becomes our vocab_size: the
    extra rows are tokens the tokenizer never produces, and the logits keep the release's width."""
    bad = [f"{k}={raw[k]!r} (supported: {', '.join(map(repr, ok))})" for k, ok in REQUIRED.items()
           if k in raw and raw[k] not in ok]
    if bad:
        raise ValueError(f"{source}: cannot import this LLaDA variant: {'; '.join(bad)}")
    missing = [k for k in ("d_model", "n_layers", "n_heads", "vocab_size", "mask_token_id") if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}")
    d = raw["d_model"]
    hidden = raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d
    return {"vocab_size": raw.get("embedding_size") or raw["vocab_size"], "dim": d, "n_layers": raw["n_layers"],
            "n_heads": raw["n_heads"], "n_kv_heads": raw.get("n_kv_heads") or raw["n_heads"], "ffn_hidden": hidden,
            "rope_theta": float(raw.get("rope_theta", 10000.0)), "norm_eps": float(raw.get("rms_norm_eps", 1e-5)),
            "qk_norm": False, "qkv_bias": bool(raw.get("include_qkv_bias", False)),
            "tie_embeddings": bool(raw.get("weight_tying", False)), "mask_id": raw["mask_token_id"]}


def llada_config(cfg: LladaModelConfig, base: dict | None = None) -> dict:
    """config.json for our model: `base` (the source folder's config.json, so every field tools read is kept)
    with our shape written over it; without a base, the release's architecture fields."""
    if cfg.qk_norm or cfg.causal:
        raise ValueError(f"model.qk_norm={cfg.qk_norm}, model.causal={cfg.causal}: LLaDA's layout has no per-head "
                         "qk-norm and is bidirectional; export with --format hf")
    out = dict(base) if base else {**BASE_CONFIG, "vocab_size": cfg.vocab_size,
                                    "max_sequence_length": cfg.max_seq_len, "init_std": cfg.init_std}
    out.update({"d_model": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
                "mlp_hidden_size": cfg.ffn_hidden, "embedding_size": cfg.vocab_size, "rope_theta": cfg.rope_theta,
                "rms_norm_eps": cfg.norm_eps, "mask_token_id": cfg.mask_id, "weight_tying": cfg.tie_embeddings})
    if cfg.qkv_bias or "include_qkv_bias" in out:  # a source config without the key keeps its exact field set
        out["include_qkv_bias"] = cfg.qkv_bias
    return out


def weight_files(folder: Path) -> dict[str, str]:
    """{LLaDA key: file name} from the index, or every key of the single model.safetensors."""
    index = folder / INDEX
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
    if (folder / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(folder / SINGLE, "pt") as f:
            return {k: SINGLE for k in f.keys()}
    raise FileNotFoundError(f"{folder}: no {SINGLE} and no {INDEX}")


def read(folder: str | Path) -> tuple[dict[str, torch.Tensor], LladaModelConfig]:
    """(state dict with our keys in the file's dtype, our model config) of a LLaDA folder."""
    d = Path(folder)
    raw = read_raw_config(d)
    cfg = LladaModelConfig(**model_fields(raw, d / "config.json"), max_seq_len=raw.get("max_sequence_length", 4096))
    files = weight_files(d)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(files.values())):
        path = d / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {INDEX} but missing")
        for key, tensor in load_file(path).items():
            ours = our_key(key)
            if ours is None:
                raise ValueError(f"{path}: key {key} has no counterpart in our model (att_proj: a fused q/k/v "
                                 "block_type is not supported)")
            state[ours] = tensor
    if cfg.tie_embeddings:  # the release leaves the head out when tied; our module names the matrix twice
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    return state, cfg


def write(state: dict[str, torch.Tensor], cfg: LladaModelConfig, out_dir: str | Path,
          source: str | Path | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Write our weights in LLaDA's layout. With a `source` LLaDA folder: its config.json fields, its sharding
    (each key into the shard file it had there) and its other files (tokenizer, generation config, modeling
    code) are kept; without one a single model.safetensors. `dtype` None keeps the tensors' own."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source) if source is not None else None
    if src is not None and src.resolve() == out.resolve():
        raise ValueError(f"{out}: the export would overwrite its source folder; choose another --out")
    config = llada_config(cfg, read_raw_config(src) if src else None)
    theirs = {their_key(k): v.detach().to(dtype or v.dtype).contiguous() for k, v in state.items()
              if not (cfg.tie_embeddings and k == "lm_head.weight")}
    placement = weight_files(src) if src else {k: SINGLE for k in theirs}
    unplaced = sorted(set(theirs) ^ set(placement))
    if unplaced:
        raise ValueError(f"the weights and {src}'s key set differ: {', '.join(unplaced[:5])}")
    written = []
    for name in sorted(set(placement.values())):
        shard = {k: theirs[k] for k in sorted(theirs) if placement[k] == name}
        save_file(shard, out / name, metadata={"format": "pt"})
        written.append(str(out / name))
    if len(written) > 1 or (src and (src / INDEX).is_file()):
        total = sum(t.numel() * t.element_size() for t in theirs.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(placement.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        written.append(str(out / INDEX))
    if "torch_dtype" in config or src is None:  # the release has none (its "precision" field stays as it was)
        config["torch_dtype"] = str(next(iter(theirs.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written.append(str(out / "config.json"))
    return written + (copy_other_files(src, out) if src else [])


def copy_other_files(source: Path, out: Path) -> list[str]:
    """Every top-level file of `source` but its config and weights (tokenizer, generation config, modeling
    code, README), so the export drops into tools built for the release. Subfolders (.git, caches) stay."""
    weights = set(weight_files(source).values()) | {INDEX, SINGLE, "config.json"}
    copied = []
    for path in sorted(source.iterdir()):
        shard = re.fullmatch(r"model-\d+-of-\d+\.safetensors", path.name)
        if path.is_file() and path.name not in weights and not shard:
            shutil.copy2(path, out / path.name)
            copied.append(str(out / path.name))
    return copied
