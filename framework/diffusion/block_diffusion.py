"""Block diffusion (BD3-LM, Arriola et al. 2025; Fast-dLLM v2, Wu et al. 2025): pure functions for training.

A row of L tokens is cut into blocks of `block_size` by position (block of token i = i // block_size). Each
block is masked at its own noise level, and one forward runs over [noised ; clean] (2L tokens) with BD3-LM's
vectorised mask (kuleshov-group/bd3lms, `block_diff_mask`):
- a noised token attends every token of its own noised block (bidirectional inside the block),
- and the clean tokens of strictly earlier blocks;
- a clean token attends the clean tokens of its own and earlier blocks (block-causal), never a noised one.
So the noised block k sees exactly what a decoder sees when it fills block k after committing blocks < k,
and the clean copy's keys are those a decoder caches: decoding with an exact KV cache matches training.
The loss is the masked-diffusion cross-entropy on masked tokens only, each weighted by 1 / its block's p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def block_index(positions: Tensor, block_size: int) -> Tensor:
    """Block of each token from its position: any shape of long -> same shape."""
    return torch.div(positions, block_size, rounding_mode="floor")


def block_causal_mask(q_blocks: Tensor, k_blocks: Tensor, strict: bool = False) -> Tensor:
    """(..., Lq), (..., Lk) block indices -> (..., Lq, Lk) bool: key block <= query block (< when strict)."""
    q, k = q_blocks[..., :, None], k_blocks[..., None, :]
    return k < q if strict else k <= q


def bd3lm_mask(seq_len: int, block_size: int, device: torch.device | None = None) -> Tensor:
    """BD3-LM's training mask over [noised ; clean]: (2L, 2L) bool, True = may attend."""
    blocks = block_index(torch.arange(seq_len, device=device), block_size)
    same = blocks[:, None] == blocks[None, :]
    noised_to_clean = block_causal_mask(blocks, blocks, strict=True)
    clean_to_clean = block_causal_mask(blocks, blocks)
    top = torch.cat((same, noised_to_clean), dim=1)
    bottom = torch.cat((torch.zeros_like(same), clean_to_clean), dim=1)
    return torch.cat((top, bottom), dim=0)


def with_key_mask(mask: Tensor, key_real: Tensor | None) -> Tensor:
    """mask (Lq, Lk) or (B, Lq, Lk) and key_real (B, Lk) -> (B, Lq, Lk); every query keeps at least its diagonal.

    A query with no admissible key (a hidden padding token) would softmax over nothing and give NaN, which then
    poisons every query through its value vector (0 * NaN); letting it see itself keeps it finite (it is padding,
    never read). Diagonal = key column Lk - Lq + i (queries are the last Lq keys, as after a KV cache).
    """
    if key_real is not None:
        mask = mask & key_real.to(torch.bool)[:, None, :]
    elif mask.dim() == 2:
        mask = mask[None]
    lq, lk = mask.shape[-2:]
    diag = torch.eye(lq, lk, dtype=torch.bool, device=mask.device).roll(lk - lq, dims=1)
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | (empty & diag)


def block_noise_levels(batch: int, seq_len: int, block_size: int, gen: torch.Generator,
                       eps: float = 1e-3) -> Tensor:
    """Per-block mask probability p = (1 - eps) t + eps, t ~ U(0, 1), spread to its tokens: (B, L) float32."""
    n_blocks = -(-seq_len // block_size)
    t = torch.rand(batch, n_blocks, generator=gen, device=gen.device)
    p = (1.0 - eps) * t + eps
    return p.repeat_interleave(block_size, dim=1)[:, :seq_len]


def mask_tokens(ids: Tensor, p_token: Tensor, mask_id: int, gen: torch.Generator,
                maskable: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mask each token with its own probability: ids, p_token (B, L) -> (noisy ids, masked bool) (B, L)."""
    u = torch.rand(ids.shape, generator=gen, device=gen.device).to(ids.device)
    masked = u < p_token.to(ids.device)
    if maskable is not None:
        masked &= maskable.to(torch.bool)
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked


def block_diffusion_loss(logits: Tensor, targets: Tensor, masked: Tensor, p_token: Tensor,
                         supervised: Tensor | None = None, normalize: str = "token") -> Tensor:
    """sum over masked (& supervised) tokens of CE / p_token, normalised: () float32.

    logits (B, L, V); targets, masked, p_token, supervised (B, L). normalize "token": divided by B * L
    (pretraining, LLaDA's convention) or, with `supervised`, by the supervised token count; "answer_length":
    each row's sum over its supervised length, mean over rows (LLaDA SFT).
    """
    if normalize not in ("answer_length", "token"):
        raise ValueError(f"normalize={normalize!r}; valid: 'answer_length', 'token'")
    picked = masked if supervised is None else masked & supervised.to(torch.bool)
    ce = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    ce[picked] = F.cross_entropy(logits[picked].float(), targets[picked], reduction="none")
    weighted = ce / p_token.float()
    if supervised is None:
        return weighted.sum() / targets.numel()
    lengths = supervised.sum(dim=1).clamp(min=1).float()
    if normalize == "answer_length":
        return (weighted.sum(dim=1) / lengths).mean()
    return weighted.sum() / lengths.sum()
