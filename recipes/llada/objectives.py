"""The LLaDA recipe's training objectives: masked diffusion (pretraining and SFT) and the AR twin's.

Each is a function (cfg, model, batch, gen) -> (loss, metrics) so the recipe's `loss` only picks one.
Pretraining batches are packed token streams ({"input_ids", "doc_ids"}); SFT batches are
{"input_ids", "prompt_len", "answer_len"}: prompt, answer, then EOS padding to seq_len.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.diffusion.masked import (
    forward_mask,
    masked_diffusion_loss,
    masked_sft_loss,
    random_length_crop,
    sample_mask_ratio,
)


def sft_regions(batch: dict, supervise_padding: bool) -> tuple[Tensor, Tensor]:
    """(answer, supervised) bool (B, L): answer = every position after the prompt (answer and EOS
    padding, all maskable so training inputs look like decoding ones); supervised = the answer up to its
    first EOS, plus the padding when supervise_padding (LLaDA supervises it: that is how the model
    learns where an answer ends)."""
    ids = batch["input_ids"]
    cols = torch.arange(ids.shape[1], device=ids.device)[None, :]
    start = batch["prompt_len"].to(ids.device)[:, None]
    answer = cols >= start
    supervised = answer if supervise_padding else answer & (cols < start + batch["answer_len"].to(ids.device)[:, None])
    return answer, supervised


def drop_prompts(ids: Tensor, answer: Tensor, prob: float, mask_id: int, gen: torch.Generator) -> Tensor:
    """Replace the whole prompt by mask tokens in a `prob` fraction of rows: the unconditional model
    classifier-free guidance contrasts with (LLaDA's CFG masks the prompt the same way at decoding)."""
    drop = torch.rand(ids.shape[0], generator=gen, device=gen.device).to(ids.device) < prob
    return torch.where(drop[:, None] & ~answer, torch.full_like(ids, mask_id), ids)


def masked_pretrain(cfg, model, batch: dict, gen: torch.Generator):
    """LLaDA pretraining: mask every token with p ~ U(eps, 1); 1% of rows at a random length."""
    ids = batch["input_ids"]
    b, length = ids.shape
    o = cfg.objective
    p_mask = sample_mask_ratio(b, gen, eps=o.eps, antithetic=o.antithetic).to(ids.device)
    keep = random_length_crop(b, length, gen, prob=o.random_length_prob).to(ids.device)
    noisy, masked = forward_mask(ids, p_mask, cfg.model.mask_id, gen, maskable=keep)
    cropped = not bool(keep.all())
    doc_ids = batch.get("doc_ids") if cfg.data.doc_attention else None
    logits = model(noisy, key_padding_mask=keep if cropped else None, doc_ids=doc_ids)
    loss = masked_diffusion_loss(logits, ids, masked, p_mask, loss_mask=keep)
    return loss, {"mask_rate": masked.float().mean()}


def random_visible(batch: dict, gen: torch.Generator) -> Tensor:
    """(B, L) bool: each row keeps a prefix of uniformly drawn length, from its answer's first EOS to L.

    Rows of fixed length L let a bidirectional model read answer positions off the distance to the row's
    end; decoding with any other prompt + gen_length total then misplaces them (measured on the tasks:
    7.5% exact match when the total matched training, 0% at gen_length 32). Hiding a random tail of the
    EOS padding (attention and loss) removes that anchor, as LLaDA's per-batch padding does.
    """
    ids = batch["input_ids"]
    lo = (batch["prompt_len"] + batch["answer_len"]).to(ids.device)
    u = torch.rand(ids.shape[0], generator=gen, device=gen.device).to(ids.device)
    length = lo + (u * (ids.shape[1] - lo + 1)).long().clamp(max=ids.shape[1] - lo)
    return torch.arange(ids.shape[1], device=ids.device)[None, :] < length[:, None]


def masked_sft(cfg, model, batch: dict, gen: torch.Generator):
    """LLaDA SFT: the prompt is never masked; the answer (and its EOS padding) is, with p ~ U(eps, 1)."""
    ids, s = batch["input_ids"], cfg.sft
    answer, supervised = sft_regions(batch, s.supervise_padding)
    visible = random_visible(batch, gen) if s.random_length else None
    if visible is not None:
        answer, supervised = answer & visible, supervised & visible
    p_mask = sample_mask_ratio(ids.shape[0], gen, eps=cfg.objective.eps, antithetic=cfg.objective.antithetic)
    p_mask = p_mask.to(ids.device)
    noisy, masked = forward_mask(ids, p_mask, cfg.model.mask_id, gen, maskable=answer)
    if s.prompt_dropout:
        noisy = drop_prompts(noisy, answer, s.prompt_dropout, cfg.model.mask_id, gen)
    logits = model(noisy, visible)
    loss = masked_sft_loss(logits, ids, masked, p_mask, supervised, s.normalize)
    return loss, {"mask_rate": (masked & answer).sum() / answer.sum().clamp(min=1)}


def autoregressive(cfg, model, batch: dict, gen: torch.Generator):
    """The AR twin: next-token cross-entropy, on every token (pretraining) or on the answer (SFT, with
    the same supervise_padding policy), averaged per supervised token."""
    ids = batch["input_ids"]
    doc_ids = batch.get("doc_ids") if cfg.data.doc_attention else None
    logits = model(ids, doc_ids=doc_ids)[:, :-1]
    targets = ids[:, 1:]
    if "prompt_len" in batch:
        supervised = sft_regions(batch, cfg.sft.supervise_padding)[1][:, 1:]
    else:
        supervised = torch.ones_like(targets, dtype=torch.bool)
    ce = F.cross_entropy(logits[supervised].float(), targets[supervised])
    return ce, {"supervised_tokens": supervised.sum().float()}
