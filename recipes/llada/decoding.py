"""Decoding for the LLaDA recipe: its sample config -> the framework's decoders, in batches of prompts.

A masked-diffusion model decodes with framework.diffusion.masked_decode.decode (reference, threshold,
cache), a block-diffusion one (objective.name=block_diffusion) with framework.diffusion.block_decode (exact
cache); the AR twin (model.causal) with its KV cache. Under ZeRO-3 every forward gathers parameters
collectively, so all ranks must run the same number of forwards: `lockstep` turns off what makes that
number data-dependent (stopping at EOS, threshold decoding).

`sample.cfg_scale` means what it means in every recipe: logits = uncond + s (cond - uncond), with uncond the
model's logits for the prompt replaced by masks; s = 1 is guidance off (no unconditional forward) and s = 0
the unconditional answer. LLaDA's generate.py writes uncond + (w + 1)(cond - uncond): its `cfg_scale = w` is
`sample.cfg_scale = w + 1` here (its default w = 0 is our 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from framework.data.sft import left_pad_prompts
from framework.diffusion.block_decode import BlockDecodeConfig, block_decode
from framework.diffusion.masked_decode import DecodeConfig, decode, decode_autoregressive


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["The government said", "In Sydney, police"])
    gen_length: int = 32
    block_length: int = 16
    steps: int = 32  # reference decoder: total steps (= gen_length: one token per step)
    threshold: float = 0.0  # > 0: commit every token at least this confident (Fast-dLLM), steps unused
    cache: Literal["none", "prefix", "dual"] = "none"  # approximate KV cache refreshed at block boundaries
    refresh_every: int = 0  # also refresh the cache every this many steps inside a block (0: never)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    temperature: float = 0.0
    # Classifier-free guidance, uncond + s (cond - uncond) as in every recipe: 1 = off, 0 = unconditional (prompt
    # masked). LLaDA's generate.py `cfg_scale = w` is w + 1 here. Train with sft.prompt_dropout > 0.
    cfg_scale: float = 1.0
    # Confidence of a prediction (masked_decode.py): "full" softmax as LLaDA's generate.py, or "without_mask",
    # p / (1 - p_mask). "auto": full for a train.init_from LLaDA-layout folder (so published settings reproduce
    # token for token), else without_mask (this framework's runs, as before); validate() resolves it.
    confidence: Literal["auto", "full", "without_mask"] = "auto"
    batch_size: int = 32  # prompts decoded together (left-padded)


def decode_config(s: SampleConfig, lockstep: bool = False, shift: bool = False) -> DecodeConfig:
    """The framework decoder's settings; ValueError (naming the field) when they do not fit together. `shift` is
    the run's objective.shift (a Dream-style model: the output at i predicts token i + 1)."""
    return DecodeConfig(gen_length=s.gen_length, block_length=s.block_length, steps=s.steps,
                        threshold=0.0 if lockstep else s.threshold, cache=s.cache, refresh_every=s.refresh_every,
                        remasking=s.remasking, temperature=s.temperature, cfg_scale=s.cfg_scale,
                        confidence="without_mask" if s.confidence == "auto" else s.confidence, shift=shift)


def block_decode_config(s: SampleConfig, block_size: int, lockstep: bool = False) -> BlockDecodeConfig:
    """A block-diffusion run's decoder (objective.name=block_diffusion): blocks of the training block_size, and
    sample.steps (total, as for the reference decoder) shared out per block; sample.threshold > 0 commits every
    token above it (LLaDA2Pipeline's rule), 0 (or lockstep) only each step's quota of the most confident ones."""
    steps = max(1, min(block_size, s.steps * block_size // s.gen_length))
    threshold = s.threshold if s.threshold > 0 and not lockstep else 1.0  # no probability exceeds 1
    return BlockDecodeConfig(gen_length=s.gen_length, block_size=block_size, steps=steps, threshold=threshold,
                             lockstep=lockstep)


def generate_answers(model, cfg, prompts: list[list[int]], *, eos_id: int, pad_id: int, device: torch.device,
                     lockstep: bool = False, gen: torch.Generator | None = None) -> tuple[list[list[int]], int]:
    """Answers (token ids up to, excluding, the first EOS) for prompts, and the number of forwards."""
    s = cfg.sample
    answers: list[list[int]] = []
    forwards = 0
    stop = None if lockstep else eos_id
    for lo in range(0, len(prompts), s.batch_size):
        ids, mask = left_pad_prompts(prompts[lo:lo + s.batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if cfg.objective.name == "block_diffusion":
            out = block_decode(model, ids, mask, block_decode_config(s, cfg.objective.block_size, lockstep),
                               mask_id=cfg.model.mask_id, eos_id=stop)
        elif cfg.model.causal:
            out = decode_autoregressive(model, ids, mask, s.gen_length, eos_id=stop, temperature=s.temperature,
                                        gen=gen)
        else:
            dcfg = decode_config(s, lockstep, shift=cfg.objective.shift)
            out = decode(model, ids, mask, dcfg, mask_id=cfg.model.mask_id, eos_id=stop, gen=gen)
        forwards += out.forwards
        for row in out.tokens.tolist():
            answers.append(row[: row.index(eos_id)] if eos_id in row else row)
    return answers, forwards


def detokenize(sp, ids: list[int]) -> str:
    """Text of ids; ids past the tokenizer (the model's vocabulary is rounded up) read as <unk>."""
    size = sp.get_piece_size()
    return sp.decode([i if 0 <= i < size else sp.unk_id() for i in ids])
