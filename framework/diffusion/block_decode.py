"""Decoding a block-diffusion LM (framework/diffusion/block_diffusion.py): block by block, with an exact KV cache.

The rules are those of diffusers' LLaDA2Pipeline with BlockRefinementScheduler (greedy, editing off), so an
`--format hf` export run through that pipeline gives the same tokens:
- Blocks are fixed by position (block = position // block_size, as in training), the prompt included: the first
  block decoded is the one holding the prompt's end, its prompt tokens stay as they are. Decoding covers whole
  blocks, so the last one may run past prompt + gen_length; those tail tokens are decoded but never attended.
- Attention is block-causal: a token sees its own block and every earlier one, never a later one.
- Each step predicts argmax tokens and their softmax probability (the mask token included, as the pipeline
  does); with quota q = the step's share of block_size over `steps` (remainder first), a row commits every
  masked token with probability > threshold when there are at least q of them, else its q most confident.
  A block gets at most `steps` forwards.
- A row is finished once its answer holds an EOS with no mask before it; it then leaves the working batch
  and everything after its first EOS reads EOS.

Exact cache: under block-causal attention the keys and values of a committed block never change, so they are
computed once, by the first forward of the next block (whose queries are [finished block ; new block]) and
cached; later steps of a block run only its block_size tokens against the cache. `cache=False` recomputes
the whole prefix every step (the pipeline's way): same tokens, for tests.

Batching left-padded prompts of different lengths: each row is shifted by whole blocks so that every row's
first decoded block sits on the same columns; a row then behaves exactly as if decoded alone.

The model: framework.nn.llada.LladaModel.forward's signature, with `attn_mask` (B, Lq, Lk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.diffusion.block_diffusion import block_causal_mask, with_key_mask
from framework.diffusion.masked import num_transfer_tokens
from framework.diffusion.masked_decode import fill_after_eos


@dataclass
class BlockDecodeConfig:
    gen_length: int = 32
    block_size: int = 32
    steps: int = 32  # at most this many forwards per block (LLaDA2Pipeline's num_inference_steps)
    threshold: float = 0.95  # commit every masked token more confident than this (at least the step's quota)
    cache: bool = True  # exact KV cache of committed blocks; False recomputes the prefix every step
    minimal_topk: int = 1  # as the pipeline: steps is capped at gen_length // minimal_topk
    # ZeRO-3 (every rank must make the same forwards): always `steps` forwards per block and the most blocks any
    # prompt length can need; callers also turn off EOS exits and the threshold (recipes/llada/decoding.py)
    lockstep: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.gen_length < 1 or self.steps < 1 or self.minimal_topk < 1:
            raise ValueError(f"block decoding needs block_size, gen_length, steps, minimal_topk >= 1 (got "
                             f"{self.block_size}, {self.gen_length}, {self.steps}, {self.minimal_topk})")


@dataclass
class BlockDecodeResult:
    tokens: Tensor  # (B, gen_length): the answers, EOS after each row's first EOS
    forwards: int  # model calls (each over the whole working batch)
    committed: int  # tokens committed over all rows (tokens per forward = committed / forwards / rows)


@dataclass
class Layout:
    """Where each row's tokens sit: column c of row i holds position c - shift[i] (negative: left padding)."""

    lengths: Tensor  # (B,) real prompt tokens
    shift: Tensor  # (B,) multiple of block_size
    first_block: int  # column block where decoding starts
    n_blocks: int  # blocks decoded
    columns: int
    block_size: int


def block_layout(prompt_mask: Tensor, gen_length: int, block_size: int, lockstep: bool = False) -> Layout:
    """Shift rows by whole blocks so every row's first decoded block (the one holding its prompt's end) aligns."""
    n = prompt_mask.to(torch.bool).sum(dim=1)
    own_first = torch.div(n, block_size, rounding_mode="floor")
    first = int(own_first.max())
    own_end = torch.div(n + gen_length + block_size - 1, block_size, rounding_mode="floor")
    n_blocks = -(-gen_length // block_size) + 1 if lockstep else int((own_end - own_first).max())
    return Layout(n, (first - own_first) * block_size, first, n_blocks, (first + n_blocks) * block_size, block_size)


def pipeline_commit(confidence: Tensor, active: Tensor, quota: int, threshold: float) -> Tensor:
    """BlockRefinementScheduler's choice: (R, Lb) probabilities and masked positions -> (R, Lb) bool commits."""
    conf = torch.where(active, confidence.float(), -math.inf)
    high = conf > threshold
    k = torch.clamp(active.sum(dim=1), max=quota)
    ranks = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    top = (ranks < k[:, None]) & active
    return torch.where((high.sum(dim=1) >= quota)[:, None], high, top)


class _Rows:
    """The working batch on the common column grid."""

    def __init__(self, prompt_ids: Tensor, lay: Layout, gen_length: int, mask_id: int) -> None:
        b, p = prompt_ids.shape
        cols = torch.arange(lay.columns, device=prompt_ids.device)[None, :]
        self.pos = cols - lay.shift[:, None]  # (B, C) position of each column
        n = lay.lengths[:, None]
        prompt = (self.pos >= 0) & (self.pos < n)
        src = (p - n + self.pos).clamp(0, p - 1)  # left-padded prompt: its real tokens are the last n
        self.x = torch.where(prompt, prompt_ids.gather(1, src), torch.full_like(self.pos, mask_id))
        last = torch.div(n + gen_length + lay.block_size - 1, lay.block_size, rounding_mode="floor") * lay.block_size
        self.decodable = (self.pos >= n) & (self.pos < last)  # the row's whole blocks from its prompt's end
        self.key_real = (self.pos >= 0) & (self.pos < n + gen_length)
        self.answer = (self.pos >= n) & (self.pos < n + gen_length)
        self.positions = torch.where(self.key_real | self.decodable, self.pos, 0).clamp(min=0)
        self.index = torch.arange(b, device=prompt_ids.device)

    def keep(self, rows: Tensor) -> None:
        for name in ("pos", "x", "decodable", "key_real", "answer", "positions", "index"):
            setattr(self, name, getattr(self, name)[rows])

    def answers(self, gen_length: int) -> Tensor:
        """(R, gen_length) answer tokens of the working rows."""
        return self.x[self.answer].view(-1, gen_length)


def _attn(rows: _Rows, q_lo: int, hi: int, block_size: int) -> Tensor:
    """Block-causal mask of query columns [q_lo, hi) over key columns [0, hi), padding removed: (R, Lq, Lk)."""
    blocks = torch.arange(hi, device=rows.x.device) // block_size
    return with_key_mask(block_causal_mask(blocks[q_lo:], blocks), rows.key_real[:, :hi])


def _finished(rows: _Rows, mask_id: int, eos_id: int) -> Tensor:
    """Rows whose answer holds an EOS with no mask before it: (R,) bool."""
    is_mask = ((rows.x == mask_id) & rows.answer).long()
    before = torch.cumsum(is_mask, dim=1) - is_mask
    return ((rows.x == eos_id) & rows.answer & (before == 0)).any(dim=1)


@torch.no_grad()
def block_decode(model, prompt_ids: Tensor, prompt_mask: Tensor, cfg: BlockDecodeConfig, *, mask_id: int,
                 eos_id: int | None = None) -> BlockDecodeResult:
    """Decode answers for left-padded prompts (B, P) with mask (B, P) -> BlockDecodeResult((B, gen_length))."""
    g, bs = cfg.gen_length, cfg.block_size
    lay = block_layout(prompt_mask, g, bs, cfg.lockstep)
    rows = _Rows(prompt_ids, lay, g, mask_id)
    out = torch.full((prompt_ids.shape[0], g), mask_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    steps = min(cfg.steps, g // cfg.minimal_topk)
    quota = num_transfer_tokens(torch.tensor([bs]), steps)[0].tolist()
    cache, cached, forwards, committed = None, 0, 0, 0
    for k in range(lay.n_blocks):
        lo = (lay.first_block + k) * bs
        hi = lo + bs
        step = 0
        while step < steps and (cfg.lockstep or bool(((rows.x[:, lo:hi] == mask_id) & rows.decodable[:, lo:hi]).any())):
            q_lo = cached if cfg.cache else 0
            logits, new = model(rows.x[:, q_lo:hi], None, positions=rows.positions[:, q_lo:hi],
                                past=cache if cfg.cache else None, return_cache=True,
                                logits_range=(lo - q_lo, hi - q_lo), attn_mask=_attn(rows, q_lo, hi, bs))
            forwards += 1
            if cfg.cache and q_lo < lo:  # the finished blocks' keys are final: cache them once
                done_cols = new.columns(torch.arange(lo - q_lo, device=rows.x.device))
                cache, cached = (done_cols if cache is None else cache.extend(done_cols)), lo
            x0 = logits.argmax(dim=-1)  # the pipeline's greedy pick, on the logits themselves
            confidence = F.softmax(logits.float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            block = rows.x[:, lo:hi]
            commit = pipeline_commit(confidence, (block == mask_id) & rows.decodable[:, lo:hi], quota[step],
                                     cfg.threshold)
            rows.x[:, lo:hi] = torch.where(commit, x0, block)
            committed += int(commit.sum())
            step += 1
            if eos_id is not None:
                done = _finished(rows, mask_id, eos_id)
                if bool(done.any()):
                    out[rows.index[done]] = fill_after_eos(rows.answers(g)[done], eos_id)
                    rows.keep(~done)
                    cache = None if cache is None else cache.rows(~done)
                    if rows.x.shape[0] == 0:
                        return BlockDecodeResult(out, forwards, committed)
    answers = rows.answers(g)
    out[rows.index] = answers if eos_id is None else fill_after_eos(answers, eos_id)
    return BlockDecodeResult(out, forwards, committed)
