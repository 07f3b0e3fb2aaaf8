"""Parallel-unmasking decoders for masked diffusion LMs, batched over left-padded prompts.

One loop serves the three decoders of the literature:
- LLaDA reference (Nie et al. 2025): a fixed number of steps per semi-autoregressive block, each step
  commits the k most confident (or random) masked tokens of the block; Gumbel-max sampling in float64; CFG
  with the framework's convention (framework/diffusion/guidance.py): uncond + s (cond - uncond), s = 1 off,
  s = 0 unconditional; LLaDA's own `cfg_scale = w` is s = w + 1.
- Confidence-threshold parallel decoding (Fast-dLLM, Wu et al. 2025): each step commits every masked
  token of the block whose confidence is >= threshold, and always at least the most confident one.
- Approximate KV caching (Fast-dLLM): at each block boundary one full forward refreshes the keys and
  values of the prefix (and, "dual", of the suffix); the block's later steps run only the block (prefix
  mode: block + suffix) against that cache. Keys are cached after RoPE, so positions stay exact; what is
  approximate is that cached tokens do not see the block change until the next refresh.

Confidence (`confidence`): the probability of the predicted token under the full softmax, as LLaDA's
generate.py computes it ("full"), or under the softmax without the mask token, p / (1 - p_mask)
("without_mask", this framework's earlier convention). They rank positions differently when the model puts
mass on the mask token unevenly, so published settings reproduce token for token only with "full". The
prediction itself never is the mask token in either mode (generate.py could commit it, leaving the position
masked; a trained model practically never prefers it).

Shifted prediction (`shift`, Dream; a model adapted from an AR one with objective.shift): the output at column
i predicts token i + 1, so a block [start, end) reads the outputs of columns [start - 1, end - 1), Dream's
`cat([logits[:, :1], logits[:, :-1]])`. With a cache, a block's forward then also recomputes the column before
the block (its committed token), whose output predicts the block's first token.

Rows stop independently: a row is finished once its answer holds an EOS with no mask before it; it is
then dropped from the working batch (no more compute), and everything after its first EOS reads EOS.

The model is any callable with the signature of framework.nn.llada.LladaModel.forward:
model(ids, key_padding_mask, *, positions, past, return_cache, logits_range) -> (logits, KVCache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.diffusion.guidance import cfg_combine
from framework.diffusion.masked import add_gumbel_noise, num_transfer_tokens


@dataclass
class DecodeConfig:
    gen_length: int = 256
    block_length: int = 32
    steps: int = 256  # reference decoder: total steps (steps == gen_length is one token per step)
    threshold: float = 0.0  # > 0: confidence-threshold decoding instead of a fixed number of steps
    cache: Literal["none", "prefix", "dual"] = "none"
    refresh_every: int = 0  # with a cache: also refresh every this many steps inside a block (0: never)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    temperature: float = 0.0
    cfg_scale: float = 1.0  # CFG: uncond + s (cond - uncond), 1 = off, 0 = unconditional (the prompt masked)
    confidence: Literal["without_mask", "full"] = "without_mask"  # softmax the confidence is read from
    shift: bool = False  # the output at i predicts token i + 1 (Dream): a block reads the columns one to the left

    def __post_init__(self) -> None:
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length={self.gen_length} must be a multiple of block_length={self.block_length}")
        blocks = self.gen_length // self.block_length
        if not self.threshold and (self.steps < blocks or self.steps % blocks):
            raise ValueError(f"steps={self.steps} must be a positive multiple of the number of blocks ({blocks})")
        if self.cache not in ("none", "prefix", "dual"):
            raise ValueError(f"cache={self.cache!r}; valid: 'none', 'prefix', 'dual'")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={self.remasking!r}; valid: 'low_confidence', 'random'")
        if self.confidence not in ("without_mask", "full"):
            raise ValueError(f"confidence={self.confidence!r}; valid: 'without_mask', 'full'")


@dataclass
class DecodeResult:
    tokens: Tensor  # (B, gen_length): the answers, EOS after each row's first EOS
    forwards: int  # model calls made (each over the whole working batch)


def left_pad_positions(prompt_mask: Tensor, gen_length: int) -> tuple[Tensor, Tensor]:
    """Key mask and RoPE positions of [left-padded prompt | answer]: (B, P) bool -> 2 x (B, P + G).

    A row's first real token sits at position 0, as it did in training; padding gets position 0 and
    is never attended.
    """
    ones = torch.ones(prompt_mask.shape[0], gen_length, dtype=torch.bool, device=prompt_mask.device)
    key_mask = torch.cat((prompt_mask.to(torch.bool), ones), dim=1)
    positions = (torch.cumsum(key_mask.long(), dim=1) - 1).clamp(min=0)
    return key_mask, positions


def generated_lengths(tokens: Tensor, eos_id: int | None) -> Tensor:
    """Tokens each row generated, up to and including its first EOS: (B, G) -> (B,) long."""
    if eos_id is None:
        return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
    is_eos = tokens == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, tokens.shape[1])
    return first.long()


def answer_finished(answer: Tensor, mask_id: int, eos_id: int) -> Tensor:
    """Rows whose answer holds an EOS with no mask before it: (B, G) -> (B,) bool."""
    is_mask = (answer == mask_id).long()
    masks_before = torch.cumsum(is_mask, dim=1) - is_mask
    return ((answer == eos_id) & (masks_before == 0)).any(dim=1)


def fill_after_eos(answer: Tensor, eos_id: int) -> Tensor:
    """Every position after a row's first EOS becomes EOS: (B, G) -> (B, G)."""
    after = torch.cumsum((answer == eos_id).long(), dim=1) > 0
    return torch.where(after, torch.full_like(answer, eos_id), answer)


class _Rows:
    """The working batch: unfinished rows' tokens, masks, positions and (with CFG) unconditional twins."""

    def __init__(self, x: Tensor, key_mask: Tensor, positions: Tensor, prompt_len: int, mask_id: int,
                 guided: bool) -> None:
        self.x, self.key_mask, self.positions = x, key_mask, positions
        self.index = torch.arange(x.shape[0], device=x.device)  # row of the caller's batch
        self.prompt_len, self.mask_id, self.guided = prompt_len, mask_id, guided
        self.padded = not bool(key_mask.all())

    def model_inputs(self, lo: int, hi: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """ids, key mask, positions of columns [lo, hi), doubled with unconditional rows under CFG."""
        ids, mask, pos = self.x[:, lo:hi], self.key_mask[:, lo:hi], self.positions[:, lo:hi]
        if self.guided:
            uncond = ids.clone()
            # LLaDA's unconditional input: the prompt replaced by masks (padding stays padding).
            prompt_cols = torch.arange(lo, hi, device=ids.device) < self.prompt_len
            uncond[:, prompt_cols] = torch.where(mask[:, prompt_cols], self.mask_id, ids[:, prompt_cols])
            ids, mask, pos = torch.cat((ids, uncond)), torch.cat((mask, mask)), torch.cat((pos, pos))
        return ids, (mask if self.padded else None), pos

    def keep(self, rows: Tensor) -> Tensor:
        """Keep only `rows` (bool over the working batch); returns the index for cache rows."""
        self.x, self.key_mask, self.positions = self.x[rows], self.key_mask[rows], self.positions[rows]
        self.index = self.index[rows]
        return torch.cat((rows, rows)) if self.guided else rows


def _guide(logits: Tensor, guided: bool, scale: float) -> Tensor:
    """CFG on the doubled batch: uncond + scale (cond - uncond) (LLaDA's w is scale - 1); identity without it."""
    if not guided:
        return logits
    cond, uncond = logits.chunk(2)
    return cfg_combine(cond, uncond, scale)


def _predict(logits: Tensor, cfg: DecodeConfig, mask_id: int,
             gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Predicted tokens and their confidence (softmax probability, or random): (R, Lb, V) -> 2 x (R, Lb).

    The mask token is never a prediction: committing it would leave the position masked, and a
    threshold decoder would loop on it forever. Its probability still counts in the "full" confidence.
    """
    no_mask = logits.clone()
    no_mask[..., mask_id] = -math.inf
    x0 = add_gumbel_noise(no_mask, cfg.temperature, gen).argmax(dim=-1)
    if cfg.remasking == "random":
        return x0, torch.rand(x0.shape, generator=gen, device=x0.device)
    probs = F.softmax((logits if cfg.confidence == "full" else no_mask).float(), dim=-1)
    return x0, probs.gather(-1, x0[..., None]).squeeze(-1)


def _choose(confidence: Tensor, candidates: Tensor, k: int, threshold: float) -> Tensor:
    """Which candidates to commit: the top k, or all >= threshold and at least the top one: (R, Lb) bool."""
    confidence = torch.where(candidates, confidence, -math.inf)
    if threshold > 0:
        top = F.one_hot(confidence.argmax(dim=1), confidence.shape[1]).bool()
        return candidates & ((confidence >= threshold) | top)
    k = min(k, confidence.shape[1])
    chosen = torch.zeros_like(candidates)
    if k > 0:
        chosen.scatter_(1, confidence.topk(k, dim=1).indices, True)
    return chosen & candidates


@torch.no_grad()
def decode(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cfg: DecodeConfig,
    *,
    mask_id: int,
    eos_id: int | None = None,
    gen: torch.Generator | None = None,
) -> DecodeResult:
    """Decode answers for left-padded prompts (B, P) with mask (B, P) -> DecodeResult((B, gen_length))."""
    batch, p = prompt_ids.shape
    g, bl = cfg.gen_length, cfg.block_length
    answer_masks = torch.full((batch, g), mask_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    key_mask, positions = left_pad_positions(prompt_mask, g)
    guided = cfg.cfg_scale != 1.0  # 1 = off: no unconditional rows at all
    rows = _Rows(torch.cat((prompt_ids, answer_masks), dim=1), key_mask, positions, p, mask_id, guided)
    out = answer_masks.clone()
    steps_per_block = 0 if cfg.threshold else cfg.steps // (g // bl)
    forwards = 0
    s = int(cfg.shift)
    if s and p == 0:
        raise ValueError("shift decoding needs a prompt of at least one token (its output predicts the first one)")

    for start in range(p, p + g, bl):
        end = start + bl
        quota = num_transfer_tokens(torch.tensor([bl]), steps_per_block)[0].tolist() if steps_per_block else None
        cache, step = None, 0
        while bool((rows.x[:, start:end] == mask_id).any()) and (quota is None or step < len(quota)):
            refresh = cfg.cache == "none" or cache is None or (cfg.refresh_every and step % cfg.refresh_every == 0)
            if refresh:
                ids, mask, pos = rows.model_inputs(0, p + g)
                logits, full = model(ids, mask, positions=pos, return_cache=True, logits_range=(start - s, end - s))
                if cfg.cache != "none":
                    outside = torch.ones(p + g, dtype=torch.bool, device=ids.device)
                    outside[start - s:] = False  # prefix cache (shift: from the column whose output reads start)
                    if cfg.cache == "dual":
                        outside[end:] = True
                    cache = full.columns(outside)
            else:
                hi = end if cfg.cache == "dual" else p + g
                ids, mask, pos = rows.model_inputs(start - s, hi)
                logits, _ = model(ids, mask, positions=pos, past=cache, return_cache=True, logits_range=(0, bl))
            forwards += 1
            x0, confidence = _predict(_guide(logits, guided, cfg.cfg_scale), cfg, mask_id, gen)
            block = rows.x[:, start:end]
            commit = _choose(confidence, block == mask_id, quota[step] if quota else 0, cfg.threshold)
            rows.x[:, start:end] = torch.where(commit, x0, block)
            step += 1
            if eos_id is not None:
                done = answer_finished(rows.x[:, p:], mask_id, eos_id)
                if bool(done.any()):
                    out[rows.index[done]] = fill_after_eos(rows.x[done, p:], eos_id)
                    cache_rows = rows.keep(~done)
                    cache = None if cache is None else cache.rows(cache_rows)
                    if rows.x.shape[0] == 0:
                        return DecodeResult(out, forwards)
    out[rows.index] = rows.x[:, p:] if eos_id is None else fill_after_eos(rows.x[:, p:], eos_id)
    return DecodeResult(out, forwards)


@torch.no_grad()
def decode_autoregressive(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    gen_length: int,
    *,
    eos_id: int | None = None,
    temperature: float = 0.0,
    gen: torch.Generator | None = None,
) -> DecodeResult:
    """Greedy (or sampled) next-token decoding of a causal model with a KV cache: (B, P) -> (B, G)."""
    batch, p = prompt_ids.shape
    key_mask, positions = left_pad_positions(prompt_mask, 0)
    padded = not bool(key_mask.all())
    logits, cache = model(prompt_ids, key_mask if padded else None, positions=positions, return_cache=True,
                          logits_range=(p - 1, p))
    out = torch.full((batch, gen_length), eos_id if eos_id is not None else 0, dtype=prompt_ids.dtype,
                     device=prompt_ids.device)
    index = torch.arange(batch, device=prompt_ids.device)
    next_pos = positions[:, -1] + 1
    forwards = 1
    for t in range(gen_length):
        token = add_gumbel_noise(logits[:, -1], temperature, gen).argmax(dim=-1)
        out[index, t] = token
        if eos_id is not None:
            alive = token != eos_id
            if not bool(alive.all()):
                index, token, next_pos, cache = index[alive], token[alive], next_pos[alive], cache.rows(alive)
                if index.numel() == 0:
                    break
        if t == gen_length - 1:
            break
        logits, new = model(token[:, None], None, positions=next_pos[:, None], past=cache, return_cache=True)
        cache, next_pos = cache.extend(new), next_pos + 1
        forwards += 1
    return DecodeResult(out, forwards)
