"""Multi-head attention kernel dispatch: flash-attn when it applies, PyTorch SDPA otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_func

    FLASH_ATTN_AVAILABLE = True
except ImportError:  # CPU machines and CUDA boxes without the `gpu` extra
    flash_attn_func = None
    FLASH_ATTN_AVAILABLE = False

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def build_attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    doc_ids: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor | None:
    """Boolean mask, True = may attend: (B or 1, 1, Lq, Lk); None when nothing is masked.

    key_padding_mask: (B, Lk) True = real token. doc_ids: (B, L) with Lq == Lk; token i attends j iff
    doc_ids[i] == doc_ids[j]. causal is aligned bottom-right (query i sits at key position i + Lk - Lq),
    the flash-attn convention, so a KV-cache decode step with Lq < Lk is causal too.
    """
    mask: Tensor | None = None
    if causal:
        q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len, device=device)[None, :] <= q_pos)[None, None]
    if doc_ids is not None:
        if q_len != k_len:
            raise ValueError(f"doc_ids needs q_len == k_len, got q_len={q_len}, k_len={k_len}")
        same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        mask = same_doc if mask is None else mask & same_doc
    if key_padding_mask is not None:
        keep = key_padding_mask.to(torch.bool)[:, None, None, :]
        mask = keep if mask is None else mask & keep
    if mask is None:
        return None
    mask = mask.expand(mask.shape[0], 1, q_len, k_len)
    # A query with no admissible key (e.g. a left-padding token under a causal mask) would softmax over
    # an empty set and produce NaN that poisons gradients; let it see itself. Such rows are padding and
    # the loss ignores them.
    # Done unconditionally: testing for empty rows first would cost a host-device sync every step.
    empty = ~mask.any(dim=-1, keepdim=True)
    diag = torch.eye(q_len, k_len, dtype=torch.bool, device=mask.device).roll(k_len - q_len, dims=1)
    return mask | (empty & diag)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    doc_ids: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention. q: (B, H, Lq, D), k, v: (B, H, Lk, D) -> (B, H, Lq, D).

    mask: a boolean mask already made by `build_attention_mask` (then causal, key_padding_mask and doc_ids
    stay unset): a model with many layers builds it once per forward instead of once per layer, which
    matters where decoding is bound by kernel launches.
    """
    if mask is not None:
        if causal or key_padding_mask is not None or doc_ids is not None:
            raise ValueError("pass either a prebuilt mask or causal/key_padding_mask/doc_ids, not both")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    needs_mask = key_padding_mask is not None or doc_ids is not None
    if FLASH_ATTN_AVAILABLE and q.is_cuda and q.dtype in _FLASH_DTYPES and not needs_mask:
        # flash-attn wants (B, L, H, D)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    if not needs_mask and (not causal or q.shape[-2] == k.shape[-2]):
        # SDPA's own causal flag is top-left aligned, which equals ours only when Lq == Lk.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    mask = build_attention_mask(
        q.shape[-2],
        k.shape[-2],
        causal=causal,
        key_padding_mask=key_padding_mask,
        doc_ids=doc_ids,
        device=q.device,
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
