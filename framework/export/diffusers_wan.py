"""A diffusers `WanTransformer3DModel` folder <-> the state dict and config of our `WanDiT`.

Folder layout (what `WanTransformer3DModel.from_pretrained(folder)` reads): `config.json` (`_class_name`
WanTransformer3DModel plus its config keys) and `diffusion_pytorch_model.safetensors`, or shards listed in
`diffusion_pytorch_model.safetensors.index.json` (`weight_map`: key -> file). The key mapping lives here and
nowhere else; reading needs no diffusers import (training processes start from a folder without it).

Our names differ from diffusers' in three ways: a rename table (below), the patch embedding (diffusers'
Conv3d kernel (dim, C, pt, ph, pw) is our Linear over patches flattened as (pt, ph, pw, C)), and the
`scale_shift_table`s (ours are `modulation` per block and `head_modulation` on top).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CLASS_NAME = "WanTransformer3DModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_VERSION = "0.42.1"  # the version the export was tested with (recorded, not enforced by diffusers)
# The config.json keys of WanTransformer3DModel that the text-to-video model uses (recipes/video_dit/wan.py's
# WanConfig holds them under the same names); a config is passed around as a plain dict of these, since
# framework/ does not import recipes.
CONFIG_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
               "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
               "rope_max_seq_len")
DEFAULTS = {"patch_size": [1, 2, 2], "in_channels": 16}  # diffusers' defaults the mapping itself needs
# Config keys of image-conditioned (I2V / FLF2V) Wan variants: their extra image branch is not implemented.
IMAGE_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")

# Our name -> diffusers' name, for everything except the patch embedding (reshaped) and per-block keys.
_TOP = {
    "time_embed.0": "condition_embedder.time_embedder.linear_1",
    "time_embed.2": "condition_embedder.time_embedder.linear_2",
    "time_proj": "condition_embedder.time_proj",
    "text_proj.0": "condition_embedder.text_embedder.linear_1",
    "text_proj.2": "condition_embedder.text_embedder.linear_2",
    "head": "proj_out",
    "head_modulation": "scale_shift_table",
}
_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm_cross": "norm2",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _rename(key: str, table: dict[str, str], block_table: dict[str, str]) -> str | None:
    """Map one key through the module-level tables (the tail .weight/.bias kept); None if unknown."""
    match = _BLOCK_KEY.fullmatch(key)
    prefix, rest, names = ("", key, table) if match is None else (f"blocks.{match[1]}.", match[2], block_table)
    for ours, theirs in names.items():
        if rest == ours or rest.startswith(ours + "."):
            return prefix + theirs + rest[len(ours):]
    return None


def to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Our WanDiT state dict -> diffusers' keys and shapes; config: CONFIG_KEYS (patch_size, in_channels)."""
    out, unknown = {}, []
    for key, value in state.items():
        if key == "patch_embed.weight":
            pt, ph, pw = config.get("patch_size", DEFAULTS["patch_size"])
            channels = config.get("in_channels", DEFAULTS["in_channels"])
            out["patch_embedding.weight"] = value.reshape(-1, pt, ph, pw, channels).permute(0, 4, 1, 2, 3)
        elif key == "patch_embed.bias":
            out["patch_embedding.bias"] = value
        elif (name := _rename(key, _TOP, _BLOCK)) is not None:
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not WanDiT weights, no diffusers name for: {', '.join(unknown[:5])}")
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers(state: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """diffusers' WanTransformer3DModel state dict -> our WanDiT keys and shapes."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out, unknown = {}, []
    for key, value in state.items():
        if key == "patch_embedding.weight":
            out["patch_embed.weight"] = value.permute(0, 2, 3, 4, 1).reshape(value.shape[0], -1)
        elif key == "patch_embedding.bias":
            out["patch_embed.bias"] = value
        elif (name := _rename(key, top, block)) is not None:
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source or 'state dict'}: keys WanDiT does not have (an image-conditioned Wan?): "
                         f"{', '.join(unknown[:5])}")
    return {k: v.contiguous() for k, v in out.items()}


def read_config(folder: str | Path) -> dict:
    """The CONFIG_KEYS present in a diffusers transformer folder's config.json (out_channels filled in);
    refuses other classes and image-conditioned variants."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a diffusers transformer folder)")
    raw = json.loads(path.read_text())
    if raw.get("_class_name") != CLASS_NAME:
        raise ValueError(f"{path}: _class_name is {raw.get('_class_name')!r}, not {CLASS_NAME!r}")
    image = [k for k in IMAGE_KEYS if raw.get(k) is not None]
    if image:
        raise ValueError(f"{path}: {', '.join(f'{k}={raw[k]}' for k in image)}: image-conditioned Wan is not "
                         f"supported (text-to-video only)")
    values = {k: raw[k] for k in CONFIG_KEYS if k in raw}
    if values.get("out_channels") is None:  # diffusers: out_channels or in_channels
        values["out_channels"] = values.get("in_channels", DEFAULTS["in_channels"])
    return values


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder: the shards named by the index, or the single file."""
    d = Path(folder)
    if (d / INDEX).is_file():
        weight_map = json.loads((d / INDEX).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{d / INDEX}: no weight_map")
        files = [d / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{d / INDEX} lists shards that are not there: {', '.join(missing[:5])}")
        return files
    if (d / WEIGHTS).is_file():
        return [d / WEIGHTS]
    raise FileNotFoundError(f"{d}: no {WEIGHTS} (or {INDEX})")


def read(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with our keys, config dict) of a diffusers WanTransformer3DModel folder, sharded or not."""
    config = read_config(folder)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(load_file(path))
    return from_diffusers(state, str(folder)), config


def is_diffusers_folder(path: str | Path) -> bool:
    """A folder whose config.json names WanTransformer3DModel."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("_class_name") == CLASS_NAME
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Keys in order, cut into groups of at most max_shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def write(state: dict[str, torch.Tensor], config: dict, out_dir: str | Path, source: dict | None = None,
          max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write our WanDiT state dict as a folder WanTransformer3DModel.from_pretrained loads; returns the paths.

    config: the CONFIG_KEYS values (WanConfig.diffusers_config()); other keys are refused, since diffusers
    would silently ignore them.
    Weights keep their dtype (fp32 or bf16 from the export); more than max_shard_bytes go into shards
    with diffusers' index file. `source` (recipe, step, ema) is recorded in config.json as `_framework_source`
    (a leading underscore: diffusers drops private keys instead of warning about an unexpected one).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(set(config) - set(CONFIG_KEYS))
    if foreign:
        raise ValueError(f"not WanTransformer3DModel config keys: {', '.join(foreign)}")
    weights = to_diffusers(state, config)
    raw = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **config, **{k: None for k in IMAGE_KEYS}}
    if source:
        raw["_framework_source"] = source
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    written = [str(out / "config.json")]
    shards = _shards(weights, max_shard_bytes)
    if len(shards) == 1:
        save_file(weights, out / WEIGHTS, metadata={"format": "pt"})
        return written + [str(out / WEIGHTS)]
    names = [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        written.append(str(out / name))
    total = sum(v.numel() * v.element_size() for v in weights.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return written + [str(out / INDEX)]


# ---------------------------------------------------------------------------------------------
# LoRA: diffusers' Wan layout (`WanPipeline.load_lora_weights`, `WanTransformer3DModel.load_lora_adapter`)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE, the name its loaders pick


def lora_to_diffusers(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """{our module: (A, B)} -> `transformer.<diffusers module>.lora_{A,B}.weight`, with `scale` (alpha / rank)
    folded into B in fp32.

    Why fold: WanLoraLoaderMixin passes no network alphas, so without adapter metadata in the file diffusers
    builds its LoraConfig with lora_alpha = rank (scale 1). Folding gives the same W + scale * B A in every
    loader that reads this layout (diffusers of any version, and tools that know nothing of metadata).
    `prefix` ("dit.") is stripped; adapters elsewhere (a text encoder) or on the patch embedding (a Conv3d in
    diffusers) have no place in this layout: ValueError naming them."""
    out, outside = {}, []
    for module, (a, b) in sorted(adapters.items()):
        name = _rename(module[len(prefix):], _TOP, _BLOCK) if module.startswith(prefix) else None
        if name is None:  # every Linear the rename tables know is a Linear in diffusers too
            outside.append(module)
            continue
        out[f"transformer.{name}.lora_A.weight"] = a.float().contiguous()
        out[f"transformer.{name}.lora_B.weight"] = (b.float() * scale).contiguous()
    if outside:
        raise ValueError(f"LoRA adapters with no place in diffusers' WanTransformer3DModel LoRA layout: "
                         f"{', '.join(outside[:5])}; export them with --merge (merged weights) or --format peft")
    return out


def save_lora(weights: dict[str, torch.Tensor], out_dir: str | Path, dtype: torch.dtype = torch.float32) -> str:
    """`lora_to_diffusers`' tensors as `pytorch_lora_weights.safetensors` in `out_dir` (beside the base
    transformer folder, where `load_lora_adapter(out_dir)` and `load_lora_weights(out_dir)` find it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in weights.items()}, out / LORA_WEIGHTS, metadata={"format": "pt"})
    return str(out / LORA_WEIGHTS)
