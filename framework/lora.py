"""LoRA adapters through peft (`lora.*` config section, any recipe): no adapter code of our own.

The trainer calls `apply` on the trainable module after `build_model` and `train.init_from` (the adapters sit on
the loaded base weights) and before DeepSpeed wraps it. peft's `inject_adapter_in_model` replaces each target
`nn.Linear` in place by a LoRA layer holding the original as `base_layer`, so the module's names stay ours
(`blocks.0.attn.wq.base_layer.weight`, `...wq.lora_A.default.weight`) and every recipe hook runs unchanged.
Base parameters get requires_grad=False, so `engine.param_groups` hands only the adapters to the optimizer
under every ZeRO stage; checkpoints still hold the whole module, so resume is exact as before.

Export helpers (`split_state`, `merge`, `write_peft`) turn a consolidated state dict of a LoRA run back into
the base model's keys, merged weights, or peft's own adapter folder.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch

from framework.config import ConfigError, LoraConfig, RunConfig

ADAPTER = "default"  # peft's adapter name inside the module tree
# How a recipe's `--format hf` model names our modules (LLaDA's transformers classes hold ours as `.model`).
HF_PREFIX = {"llada": "model."}
# `lora.targets` when the section names none, per recipe, "recipe/model.arch" or "recipe/model.arch/model.text_mode"
# (the most specific key wins): attention q/k/v/out and the FFN Linears of the transformer blocks (the joint model's
# cross-modal attention too; both streams of an MMDiT block: video and text q/k/v, out, MLP). Never a trainable text
# encoder, embeddings or heads: name those to adapt them. The VAE recipes have no default (their layers are
# convolutions).
DEFAULT_TARGETS = {
    "llada": ["blocks.*.attn.w?", "blocks.*.ffn.w?"],
    "video_dit/dit": ["dit.blocks.*.attn.*", "dit.blocks.*.cross.*", "dit.blocks.*.mlp.*"],
    "video_dit/dit/joint": ["dit.blocks.*.video.*", "dit.blocks.*.text.*"],  # JointBlock's two _Streams
    "video_dit/wan": ["dit.blocks.*.self_attn.[qkvo]", "dit.blocks.*.cross_attn.[qkvo]", "dit.blocks.*.ffn.[02]"],
    "video_audio": ["dit.blocks.*.attn.*", "dit.blocks.*.cross.*", "dit.blocks.*.mlp.*"],
}


def has_default_targets(recipe: str) -> bool:
    return any(key == recipe or key.startswith(recipe + "/") for key in DEFAULT_TARGETS)


def targets(cfg: RunConfig) -> list[str]:
    """The run's target patterns: `lora.targets`, or the recipe's (and architecture's) default when empty."""
    named = [t.strip() for t in cfg.lora.targets if t.strip()]
    if named:
        return named
    model = getattr(cfg, "model", None)
    arch, text_mode = getattr(model, "arch", None), getattr(model, "text_mode", None)
    keys = (f"{cfg.recipe}/{arch}/{text_mode}", f"{cfg.recipe}/{arch}", cfg.recipe)
    found = next((DEFAULT_TARGETS[k] for k in keys if k in DEFAULT_TARGETS), None)
    if found is None:
        raise ConfigError(f"lora.targets: recipe '{cfg.recipe}' has no default targets; name the Linear modules "
                          "to adapt, e.g. lora.targets=[wq,wk,wv,wo]")
    return list(found)


def _matches(name: str, pattern: str) -> bool:
    """peft's rule (the full name, or its trailing dotted parts), or a shell glob over the full name."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def resolve_targets(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Full names of the nn.Linear modules the patterns select; a ConfigError names a pattern that selects
    nothing (or only non-Linear modules, which peft would adapt with another layer type we do not export)."""
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for pattern in (p.strip() for p in patterns):
        hits = [n for n in modules if n and _matches(n, pattern)]
        linear = [n for n in hits if type(modules[n]) is torch.nn.Linear]
        if not hits:
            raise ConfigError(f"lora.targets: '{pattern}' matches no module of the model (e.g. "
                              f"{', '.join(_linear_names(modules)[:4])})")
        if not linear:
            raise ConfigError(f"lora.targets: '{pattern}' matches only non-Linear modules ({hits[0]}: "
                              f"{type(modules[hits[0]]).__name__}); LoRA adapts nn.Linear layers")
        chosen += [n for n in linear if n not in chosen]
    return chosen


def _linear_names(modules: dict) -> list[str]:
    return [n for n, m in modules.items() if type(m) is torch.nn.Linear]


def peft_config(lora: LoraConfig, targets: list[str]):
    import peft

    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           bias="none")


def apply(model: torch.nn.Module, cfg: RunConfig, cast_frozen: bool = True) -> str:
    """Inject the adapters, freeze everything else (bf16 under train.precision=bf16 unless not `cast_frozen`:
    loading a run for sampling keeps one dtype); a line for the log.
    An empty `lora.targets` takes the recipe's default patterns and is written back into `cfg`, so the run's
    config.yaml and checkpoints name what was adapted. A model that already holds the adapters (train.init_from
    of a LoRA run injects them to load their weights) is left as it is.
    Deterministic on every rank (same model, same RNG), so under ZeRO-3 every rank injects the same layers
    and DeepSpeed partitions the new adapter parameters when it wraps the model."""
    if cfg.lora.rank == 0:
        return ""
    cfg.lora.targets = targets(cfg)
    adapted = adapted_modules(model)
    if not adapted:
        from peft import inject_adapter_in_model

        chosen = resolve_targets(model, cfg.lora.targets)
        for p in model.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(peft_config(cfg.lora, chosen), model, adapter_name=ADAPTER)
        adapted = adapted_modules(model)
    frozen_dtype = torch.bfloat16 if cfg.train.precision == "bf16" and cast_frozen else None
    for name, p in model.named_parameters():
        trainable = ".lora_" in name
        p.requires_grad_(trainable)
        # Partitioned ZeRO-3 parameters already have the engine's dtype (zero.Init); the others are cast here so
        # frozen weights never take fp32 memory in a bf16 run, whatever the engine does with them.
        if frozen_dtype is not None and not trainable and not hasattr(p, "ds_id"):
            p.data = p.data.to(frozen_dtype)
    counts = count(model)
    return (f"LoRA rank {cfg.lora.rank} (alpha {cfg.lora.alpha:g}) on {len(adapted)} Linear layers: "
            f"{counts['trainable'] / 1e6:.3f}M trainable, {counts['frozen'] / 1e6:.2f}M frozen parameters")


def adapted_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules that hold our adapter (peft's `X.lora_A.default`)."""
    tag = f".lora_A.{ADAPTER}"
    return [name[: -len(tag)] for name, _ in model.named_modules() if name.endswith(tag)]


def count(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts (ZeRO-3 partitions report their full `ds_numel`)."""
    out = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen"] += int(getattr(p, "ds_numel", p.numel()))
    return out


def optimizer_state_bytes(trainable: int, zero_stage: int, world: int, precision: str) -> int:
    """AdamW's state per rank: two fp32 moments per trainable parameter, plus the fp32 master copy a bf16 run
    keeps; ZeRO 1-3 partition it over the ranks (rounded up), ZeRO-0 replicates it."""
    per_param = 8 + (4 if precision == "bf16" else 0)
    share = -(-trainable // world) if zero_stage >= 1 else trainable
    return share * per_param


def describe(cfg: RunConfig, recipe, world: int) -> str:
    """`--describe`: trainable vs frozen parameters and the optimizer-state bytes per rank, counted on a model
    built on the meta device (no memory, any size); also checks lora.targets against the real module names."""
    with torch.device("meta"):
        model = recipe.build_model(cfg).model
        if cfg.lora.rank > 0:
            apply(model, cfg)
    counts = count(model)
    state = optimizer_state_bytes(counts["trainable"], cfg.train.zero_stage, world, cfg.train.precision)
    return (f"trainable {counts['trainable']:,} / frozen {counts['frozen']:,} parameters"
            + (f" (LoRA rank {cfg.lora.rank})" if cfg.lora.rank > 0 else "")
            + f"; optimizer state {state / 2**20:.2f} MiB per rank (AdamW, ZeRO-{cfg.train.zero_stage}, "
              f"world {world}, {cfg.train.precision})")


# ---------------------------------------------------------------------------------------------
# Export: consolidated state dicts of a LoRA run


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """(base weights under the model's own keys, {module name: (A, B)}) from a LoRA run's state dict."""
    base, parts = {}, {}
    for key, t in state.items():
        for which in ("A", "B"):
            tag = f".lora_{which}.{ADAPTER}.weight"
            if key.endswith(tag):
                parts.setdefault(key[: -len(tag)], {})[which] = t
                break
        else:
            base[key.replace(".base_layer.", ".")] = t
    adapters = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {module}: lora_A or lora_B missing from the checkpoint")
        adapters[module] = (ab["A"], ab["B"])
    return base, adapters


def merge(base: dict[str, torch.Tensor], adapters: dict[str, tuple], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """W + (alpha / rank) B A for each adapted Linear (peft's merge, in fp32), the rest unchanged."""
    scale = lora.alpha / lora.rank
    out = dict(base)
    for module, (a, b) in adapters.items():
        key = f"{module}.weight"
        out[key] = (base[key].float() + scale * (b.float() @ a.float())).to(base[key].dtype)
    return out


def write_peft(adapters: dict[str, tuple], lora: LoraConfig, recipe: str, out_dir: str,
               dtype: torch.dtype = torch.float32) -> list[str]:
    """peft's folder (adapter_config.json + adapter_model.safetensors) for the recipe's `--format hf` model:
    keys `base_model.model.<hf module>.lora_A.weight`, as `PeftModel.save_pretrained` writes them."""
    from safetensors.torch import save_file

    prefix = HF_PREFIX.get(recipe, "")
    names = sorted(adapters)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module in names:
        a, b = adapters[module]
        tensors[f"base_model.model.{prefix}{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{prefix}{module}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config(lora, [prefix + n for n in names]).save_pretrained(str(out))
    return [str(out / "adapter_config.json"), str(out / "adapter_model.safetensors")]
