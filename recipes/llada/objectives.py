"""The LLaDA recipe's training objectives: masked diffusion (pretraining and SFT) and the AR twin's.

Each is a function (cfg, model, batch, gen) -> (loss, metrics) so the recipe's `loss` only picks one.
Pretraining batches are packed token streams ({"input_ids", "doc_ids"}); SFT batches are
{"input_ids", "prompt_len", "answer_len"}: prompt, answer, then EOS padding to seq_len.

Adapting an AR model (train.init_from an AR run, model.causal=false) uses the published options:
`objective.anneal_steps` anneals the attention mask from causal to bidirectional over the first optimizer steps
(DiffuLLaMA, Gong et al. 2024) and `objective.shift` makes position i's output predict token i + 1 (Dream, Ye et
al. 2025), so the pretrained head keeps its meaning. Both off, every objective is what it was, bit for bit.

`objective.name=block_diffusion` (BD3-LM, Arriola et al. 2025; from an AR model with train.init_from, as Fast-dLLM v2)
trains blocks of `objective.block_size` positions, each at its own noise level, attending bidirectionally inside a
block and causally across blocks; framework/diffusion/block_decode.py decodes it with an exact KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.diffusion.block_diffusion import (
    bd3lm_mask,
    block_diffusion_loss,
    block_noise_levels,
    mask_tokens,
    with_key_mask,
)
from framework.diffusion.masked import (
    anneal_ratio,
    annealed_attention_mask,
    forward_mask,
    masked_diffusion_loss,
    masked_sft_loss,
    random_length_crop,
    sample_mask_ratio,
    shift_logits,
)


def optimizer_step(model) -> int:
    """Optimizer steps taken so far: the DeepSpeed engine's `global_steps` (0 for a fresh run, train.init_from
    included; restored with a checkpoint, so a resumed run anneals from where it stopped); 0 for a bare module."""
    return int(getattr(model, "global_steps", 0))


def training_mask(cfg, model, seq_len: int, gen: torch.Generator) -> Tensor | None:
    """The annealed attention mask of this step, or None once annealing is over (or off): then the model runs
    bidirectionally and nothing is drawn, so the generator stream equals a run without annealing."""
    steps = getattr(cfg.objective, "anneal_steps", 0)  # duck-typed configs (tests, older callers) lack the keys
    step = optimizer_step(model)
    if steps <= 0 or step >= steps:
        return None
    return annealed_attention_mask(seq_len, anneal_ratio(step, steps), gen)


def diffusion_logits(cfg, model, noisy: Tensor, key_padding_mask: Tensor | None = None,
                     doc_ids: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
    """The model's logits aligned with the tokens they predict (shifted when objective.shift)."""
    kwargs = {} if attn_mask is None else {"attn_mask": attn_mask}  # models without the argument still work
    logits = model(noisy, key_padding_mask, doc_ids, **kwargs) if doc_ids is not None else \
        model(noisy, key_padding_mask, **kwargs)
    return shift_logits(logits) if getattr(cfg.objective, "shift", False) else logits


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
    attn = training_mask(cfg, model, length, gen)
    logits = diffusion_logits(cfg, model, noisy, keep if cropped else None, doc_ids, attn)
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
    logits = diffusion_logits(cfg, model, noisy, visible, attn_mask=training_mask(cfg, model, ids.shape[1], gen))
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


def block_logits(cfg, model, noisy: Tensor, clean: Tensor, key_real: Tensor | None = None,
                 doc_ids: Tensor | None = None) -> Tensor:
    """Logits of the noised copy from one forward over [noised ; clean] under BD3-LM's mask (block_diffusion.py):
    noised block k sees itself and the clean blocks before it, as a decoder filling block k does."""
    b, length = noisy.shape
    mask = bd3lm_mask(length, cfg.objective.block_size, noisy.device)
    if doc_ids is not None:  # packed documents: also attend only within one's own document
        docs = torch.cat((doc_ids, doc_ids), dim=1)
        mask = mask & (docs[:, :, None] == docs[:, None, :])
    real = None if key_real is None else torch.cat((key_real, key_real), dim=1)
    positions = torch.arange(length, device=noisy.device).repeat(2).expand(b, 2 * length)
    return model(torch.cat((noisy, clean), dim=1), None, attn_mask=with_key_mask(mask, real), positions=positions,
                 logits_range=(0, length))


def block_diffusion(cfg, model, batch: dict, gen: torch.Generator):
    """Block diffusion (BD3-LM): every block of objective.block_size positions masked at its own level
    p = (1 - eps) t + eps, one forward over [noised ; clean], CE / p on the masked tokens. SFT batches keep the
    prompt clean and supervise the answer as masked_sft does (sft.supervise_padding, random_length, normalize)."""
    ids, o = batch["input_ids"], cfg.objective
    p_token = block_noise_levels(ids.shape[0], ids.shape[1], o.block_size, gen, o.eps).to(ids.device)
    if "prompt_len" not in batch:
        doc_ids = batch.get("doc_ids") if cfg.data.doc_attention else None
        noisy, masked = mask_tokens(ids, p_token, cfg.model.mask_id, gen)
        loss = block_diffusion_loss(block_logits(cfg, model, noisy, ids, doc_ids=doc_ids), ids, masked, p_token)
        return loss, {"mask_rate": masked.float().mean()}
    s = cfg.sft
    answer, supervised = sft_regions(batch, s.supervise_padding)
    visible = random_visible(batch, gen) if s.random_length else None
    if visible is not None:
        answer, supervised = answer & visible, supervised & visible
    noisy, masked = mask_tokens(ids, p_token, cfg.model.mask_id, gen, maskable=answer)
    logits = block_logits(cfg, model, noisy, ids, visible)
    loss = block_diffusion_loss(logits, ids, masked, p_token, supervised, s.normalize)
    return loss, {"mask_rate": (masked & answer).sum() / answer.sum().clamp(min=1)}
