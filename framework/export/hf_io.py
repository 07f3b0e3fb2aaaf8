"""The Hugging Face folder of a LLaDA model: write it from our state dict, read it back into one.

Layout (what `from_pretrained` expects): `config.json` (model_type `framework_llada`, our model config's
fields, `architectures` by the causal flag, and where the weights came from), `model.safetensors` (keys
`model.<our key>`, fp32; `lm_head` left out when tied, as transformers does), and the tokenizer
(`tokenizer.json`, `tokenizer_config.json`, plus the sentencepiece `tokenizer.model`).

Reading needs no transformers import: training processes can start from a folder without paying for it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from framework.nn.llada import LladaModelConfig

MODEL_TYPE = "framework_llada"
PREFIX = "model."  # the attribute that holds the LladaModel in every one of our transformers classes


def is_hf_folder(path: str | Path) -> bool:
    """A folder whose config.json names our model type."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def write(state: dict[str, torch.Tensor], cfg: LladaModelConfig, out_dir: str | Path,
          tokenizer_model: str | Path | None = None, source: dict | None = None) -> list[str]:
    """Write the folder; `source` (recipe, step, ema) is kept in config.json as `framework_source`."""
    from framework.export.hf_llada import LladaHFConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"framework_source": source} if source else {}
    LladaHFConfig.from_model_config(cfg, **extra).save_pretrained(out)
    weights = {PREFIX + k: v.detach().float().contiguous() for k, v in state.items()
               if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    written = [str(out / "config.json"), str(out / "model.safetensors")]
    if tokenizer_model is not None:
        from framework.export.hf_tokenizer import from_sentencepiece

        written += list(from_sentencepiece(tokenizer_model).save_pretrained(out))
        shutil.copy(tokenizer_model, out / "tokenizer.model")
        written.append(str(out / "tokenizer.model"))
    return written


def read_config(folder: str | Path) -> tuple[LladaModelConfig, dict]:
    """(our model config, the raw config.json) of a folder written by `write` (or by save_pretrained)."""
    path = Path(folder) / "config.json"
    raw = json.loads(path.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, not {MODEL_TYPE!r}")
    names = {f.name for f in dataclasses.fields(LladaModelConfig)}
    return LladaModelConfig(**{k: v for k, v in raw.items() if k in names}), raw


def read(folder: str | Path) -> tuple[dict[str, torch.Tensor], LladaModelConfig]:
    """(state dict with our keys, model config); also reads sharded folders (model.safetensors.index.json)."""
    d = Path(folder)
    cfg, _ = read_config(d)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{d}: no model.safetensors (or model.safetensors.index.json)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(d / name))
    foreign = sorted(k for k in state if not k.startswith(PREFIX))
    if foreign:
        raise ValueError(f"{d}: weights outside '{PREFIX}': {', '.join(foreign[:5])}")
    state = {k[len(PREFIX):]: v for k, v in state.items()}
    if cfg.tie_embeddings:  # our module lists the shared matrix under both names
        state["lm_head.weight"] = state["embed.weight"]
    return state, cfg
