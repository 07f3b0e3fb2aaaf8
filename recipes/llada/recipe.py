"""LLaDA-style masked diffusion language model: the recipe glue between model, data and trainer."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framework import distributed as dist
from framework.config import ConfigError, RunConfig
from framework.data.text import PackedTextStream
from framework.diffusion.masked import (
    elbo_bits_per_token,
    forward_mask,
    generate,
    masked_diffusion_loss,
    random_length_crop,
    sample_mask_ratio,
)
from framework.nn.llada import LladaModel, LladaModelConfig, count_parameters, train_flops_per_token
from framework.recipe import Built, Recipe
from framework.rng import derive_seed


@dataclass
class TextDataConfig:
    dir: str = "datasets/text"  # made by data/prepare_text.py: train/, val/, tokenizer.model, tokenizer.json
    seq_len: int = 128
    doc_attention: bool = False  # attend only within a document (block-diagonal) instead of the whole pack
    max_skip_fraction: float = 0.1  # corrupt shards tolerated before the run stops


@dataclass
class MaskedObjectiveConfig:
    eps: float = 1e-3  # p_mask = (1 - eps) t + eps, so no row is left entirely unmasked
    antithetic: bool = False  # stratify t over the batch (lower-variance loss)
    random_length_prob: float = 0.01  # fraction of rows cropped to a random length (LLaDA: 1%)
    elbo_samples: int = 8  # Monte Carlo samples per sequence of the held-out ELBO


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["The government said", "In Sydney, police"])
    gen_length: int = 32
    steps: int = 32
    block_length: int = 16
    temperature: float = 0.0


@dataclass
class LladaConfig(RunConfig):
    recipe: str = "llada"
    model: LladaModelConfig = field(default_factory=LladaModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    objective: MaskedObjectiveConfig = field(default_factory=MaskedObjectiveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def tokenizer_info(data_dir: str) -> dict:
    path = Path(data_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"data.dir: no tokenizer at {path}; build the dataset first, e.g. "
                          f"`python data/prepare_text.py --out {data_dir}`")
    return json.loads(path.read_text())


class LladaRecipe(Recipe):
    name = "llada"
    config_class = LladaConfig
    unit = "tokens"

    def validate(self, cfg: LladaConfig, world: int) -> None:
        m = cfg.model
        if cfg.data.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if m.dim % m.n_heads:
            raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
        if not 0 <= m.mask_id < m.vocab_size:
            raise ConfigError(f"model.mask_id={m.mask_id} is outside the vocabulary (model.vocab_size={m.vocab_size})")
        s = cfg.sample
        if s.gen_length % s.block_length or s.steps % (s.gen_length // s.block_length):
            raise ConfigError(f"sample.gen_length ({s.gen_length}) must be a multiple of sample.block_length "
                              f"({s.block_length}) and sample.steps ({s.steps}) a multiple of the block count")

    def check_tokenizer(self, cfg: LladaConfig) -> dict:
        info = tokenizer_info(cfg.data.dir)
        if info["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{info['vocab_size']} ({cfg.data.dir}/tokenizer.json)")
        if info["mask_id"] != cfg.model.mask_id:
            raise ConfigError(f"model.mask_id={cfg.model.mask_id} but the tokenizer's <mask> id is "
                              f"{info['mask_id']} ({cfg.data.dir}/tokenizer.json)")
        return info

    def describe(self, cfg: LladaConfig) -> str:
        n = count_parameters(cfg.model)
        f = train_flops_per_token(cfg.model, cfg.data.seq_len)
        return f"{n / 1e6:.2f}M parameters, {f / 1e9:.3f} GFLOPs per training token"

    def build_model(self, cfg: LladaConfig) -> Built:
        return Built(model=LladaModel(cfg.model))

    def build_data(self, cfg: LladaConfig, split: str, rank: int, world: int, batch_multiple: int = 1):
        self.check_tokenizer(cfg)
        if split == "train" and (cfg.eval.every or cfg.eval.at_end):
            self._stream(cfg, "val", rank, world, 1)  # a held-out set too small fails now, not after training
        return self._stream(cfg, split, rank, world, batch_multiple)

    def _stream(self, cfg: LladaConfig, split: str, rank: int, world: int, batch_multiple: int) -> PackedTextStream:
        micro = (cfg.eval.micro_batch or cfg.train.micro_batch) if split == "val" else cfg.train.micro_batch
        try:
            return PackedTextStream(str(Path(cfg.data.dir) / split), seq_len=cfg.data.seq_len, micro_batch=micro,
                                    rank=rank, world=world, seed=cfg.train.seed, batch_multiple=batch_multiple,
                                    max_skip_fraction=cfg.data.max_skip_fraction)
        except (FileNotFoundError, ValueError) as e:
            key = "eval.micro_batch" if split == "val" else "train.micro_batch"
            raise ConfigError(f"data.dir ({split} split) / data.seq_len / {key}: {e}") from e

    def _forward(self, model, cfg: LladaConfig, ids, keep, doc_ids):
        return model(ids, key_padding_mask=keep, doc_ids=doc_ids if cfg.data.doc_attention else None)

    def loss(self, cfg: LladaConfig, model, helpers, batch, gen):
        ids = batch["input_ids"]
        b, length = ids.shape
        o = cfg.objective
        p_mask = sample_mask_ratio(b, gen, eps=o.eps, antithetic=o.antithetic).to(ids.device)
        keep = random_length_crop(b, length, gen, prob=o.random_length_prob).to(ids.device)
        noisy, masked = forward_mask(ids, p_mask, cfg.model.mask_id, gen, maskable=keep)
        cropped = not bool(keep.all())
        logits = self._forward(model, cfg, noisy, keep if cropped else None, batch.get("doc_ids"))
        loss = masked_diffusion_loss(logits, ids, masked, p_mask, loss_mask=keep)
        return loss, {"mask_rate": masked.float().mean()}

    def work(self, cfg: LladaConfig, batch: dict) -> tuple[float, float]:
        tokens = batch["input_ids"].numel()
        return float(tokens), tokens * train_flops_per_token(cfg.model, cfg.data.seq_len)

    def evaluate(self, model, helpers, cfg: LladaConfig, rank: int, world: int, step: int) -> dict:
        """Held-out Monte Carlo ELBO in bits per token; every rank scores its own val shards."""
        stream = self._stream(cfg, "val", rank, world, 1)
        batches = min(cfg.eval.batches, len(stream))
        gen = torch.Generator(device=dist.device()).manual_seed(derive_seed(cfg.train.seed, step, rank, 1 << 20))
        total = 0.0
        for _, batch in zip(range(batches), stream):
            ids = batch["input_ids"].to(dist.device())
            total += float(elbo_bits_per_token(lambda x: model(x), ids, cfg.model.mask_id, gen,
                                               cfg.objective.elbo_samples))
        (bits,) = dist.all_reduce([total / max(1, batches)], op="mean")
        return {"elbo_bits_per_token": bits}

    def sample(self, model, helpers, cfg: LladaConfig, rank: int, world: int, step: int, out_dir: str) -> list[str]:
        """Each rank decodes its share of the prompts (same number of forwards everywhere, for ZeRO-3)."""
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(Path(cfg.data.dir) / "tokenizer.model"))
        prompts = cfg.sample.prompts[: max(cfg.eval.samples, 0)]
        texts = []
        for prompt in dist.split_work(prompts, rank, world):
            ids = torch.tensor([sp.encode(prompt)], device=dist.device())
            s = cfg.sample
            out = generate(lambda x: model(x), ids, gen_length=s.gen_length, steps=s.steps,
                           block_length=s.block_length, mask_id=cfg.model.mask_id, temperature=s.temperature)
            texts.append(prompt + " ->" + sp.decode(_until_eos(out[0, ids.shape[1]:].tolist(), sp.eos_id())))
        lines = dist.gather_work(texts, len(prompts), world)
        if rank == 0 and lines:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "samples.txt").write_text("\n".join(lines) + "\n")
        return lines

    def export_assets(self, cfg: LladaConfig, out_dir: str) -> list[str]:
        copied = []
        for name in ("tokenizer.model", "tokenizer.json"):
            src = Path(cfg.data.dir) / name
            if src.is_file():
                shutil.copy(src, Path(out_dir) / name)
                copied.append(str(Path(out_dir) / name))
        return copied


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids
