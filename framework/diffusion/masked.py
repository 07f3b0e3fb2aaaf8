"""Masked diffusion for text (LLaDA, Nie et al. 2025, "Large Language Diffusion Models").

Forward process: at time t ~ U(0, 1) every token is replaced by the mask token independently with
probability p_mask = (1 - eps) t + eps. The model predicts all masked tokens at once, with no time input.
Training minimises the ELBO bound on the NLL

    L = -E_{t, x_t} [ 1/t * sum_{i masked} log p_theta(x_0^i | x_t) ],

estimated per batch as sum_{b, i masked} CE_{b,i} / p_mask_b / (B * L).
Every random draw takes an explicit torch.Generator so a run resumes bit-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ModelFn = Callable[[Tensor], Tensor]  # noisy ids (B, L) -> logits (B, L, V)


def sample_mask_ratio(
    batch: int, gen: torch.Generator, eps: float = 1e-3, antithetic: bool = False
) -> Tensor:
    """Per-sequence mask probability p_mask = (1 - eps) t + eps, t ~ U(0, 1): (B,) float32.

    antithetic: stratified t_i = (u + i / B) mod 1 from one uniform u, so a batch covers [0, 1) evenly
    and the loss variance across t drops.
    """
    if antithetic:
        u = torch.rand(1, generator=gen, device=gen.device)
        t = (u + torch.arange(batch, device=gen.device, dtype=torch.float32) / batch) % 1.0
    else:
        t = torch.rand(batch, generator=gen, device=gen.device)
    return (1.0 - eps) * t + eps


def forward_mask(
    input_ids: Tensor,
    p_mask: Tensor,
    mask_id: int,
    gen: torch.Generator,
    maskable: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask each token with probability p_mask[row]: ids (B, L), p_mask (B,) -> (noisy_ids, masked) (B, L).

    maskable: (B, L) bool, False positions are never masked (SFT keeps the prompt clean).
    """
    u = torch.rand(input_ids.shape, generator=gen, device=input_ids.device)
    masked = u < p_mask.to(input_ids.device)[:, None]
    if maskable is not None:
        masked = masked & maskable.to(torch.bool)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked


def random_length_crop(batch: int, seq_len: int, gen: torch.Generator, prob: float = 0.01) -> Tensor:
    """Keep mask (B, L) bool: with probability prob a row keeps only positions < a length ~ U{1..L}.

    LLaDA trains 1% of its data at random lengths so the model is not tied to the full context length;
    done per row (not per batch) so one draw never crops a whole batch.
    """
    crop_row = torch.rand(batch, generator=gen, device=gen.device) < prob
    # Drawn for every row so the generator advances the same way whatever the coin flips gave.
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=gen, device=gen.device)
    keep = torch.arange(seq_len, device=gen.device)[None, :] < lengths[:, None]
    return keep | ~crop_row[:, None]


def shift_logits(logits: Tensor) -> Tensor:
    """Shifted prediction (Dream, Ye et al. 2025; DiffuLLaMA's `shift`): the model's output at i predicts token
    i + 1, as an AR model's head does, so an adapted AR model keeps its head's meaning. Returned aligned with the
    tokens they predict: position j gets the output at j - 1, position 0 (never predicted) its own: (B, L, V)."""
    return torch.cat((logits[:, :1], logits[:, :-1]), dim=1)


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Share of the upper (future) triangle unmasked at optimizer step `step` (0-based) of an adaptation:
    DiffuLLaMA's min(1, (step + 1) / anneal_steps); 1.0 (fully bidirectional) when annealing is off."""
    return 1.0 if anneal_steps <= 0 else min(1.0, (step + 1) / anneal_steps)


def annealed_attention_mask(seq_len: int, ratio: float, gen: torch.Generator) -> Tensor:
    """(L, L) bool, True = may attend: the causal mask plus each future entry with probability `ratio`
    (DiffuLLaMA's attention-mask annealing: causal at 0, bidirectional at 1, one mask for the whole batch).

    The uniforms come from `gen` (the step's seeded generator), so a resumed run draws the same masks, and for a
    fixed generator state a larger ratio only adds entries (the mask grows monotonically)."""
    u = torch.rand(seq_len, seq_len, generator=gen, device=gen.device)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=gen.device).tril()
    return causal | (u < ratio)


def masked_diffusion_loss(
    logits: Tensor,
    targets: Tensor,
    masked: Tensor,
    p_mask: Tensor,
    loss_mask: Tensor | None = None,
) -> Tensor:
    """LLaDA loss sum_{masked} CE / p_mask[row] / (B * L): logits (B, L, V), targets, masked (B, L) -> ()."""
    weight_positions = masked if loss_mask is None else masked & loss_mask.to(torch.bool)
    # Only the selected rows of the logits go to float32: a full (B, L, V) fp32 copy is large at V=126k.
    picked_logits = logits[weight_positions].float()
    picked_targets = targets[weight_positions]
    inv_p = (1.0 / p_mask.float())[:, None].expand_as(targets)[weight_positions]
    ce = F.cross_entropy(picked_logits, picked_targets, reduction="none")
    return (ce * inv_p).sum() / targets.numel()


@torch.no_grad()
def elbo_bits_per_token(
    model_fn: ModelFn,
    input_ids: Tensor,
    mask_id: int,
    gen: torch.Generator,
    num_samples: int,
    eps: float = 1e-3,
) -> Tensor:
    """Monte Carlo upper bound on the NLL in bits per token (LLaDA ELBO): ids (B, L) -> () float32.

    Each sample draws t per row, masks, and evaluates the training loss; the mean over samples is an
    unbiased estimate of the ELBO in nats per token, divided by ln 2 for bits.
    """
    total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
    for _ in range(num_samples):
        p_mask = sample_mask_ratio(input_ids.shape[0], gen, eps=eps).to(input_ids.device)
        noisy, masked = forward_mask(input_ids, p_mask, mask_id, gen)
        total += masked_diffusion_loss(model_fn(noisy), input_ids, masked, p_mask)
    return total / num_samples / math.log(2.0)


def num_transfer_tokens(mask_count: Tensor, steps: int) -> Tensor:
    """Tokens to unmask per step, split evenly with the remainder on the first steps: (B,) -> (B, steps).

    Same as LLaDA's `get_num_transfer_tokens`.
    """
    base = mask_count[:, None] // steps
    remainder = mask_count[:, None] % steps
    step_index = torch.arange(steps, device=mask_count.device)[None, :]
    return (base + (step_index < remainder).long()).long()


def add_gumbel_noise(logits: Tensor, temperature: float, gen: torch.Generator | None = None) -> Tensor:
    """Gumbel-max scores exp(logits) / (-log u)^temperature in float64 (LLaDA): (B, L, V) -> same shape.

    argmax of the result samples softmax(logits / temperature); float64 because low-precision Gumbel
    noise lowers generation quality of masked diffusion models (Zheng et al. 2024, arXiv:2409.02908),
    which is why the LLaDA reference sampler uses it.
    """
    if temperature == 0.0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=gen, device=logits.device)
    return logits.exp() / (-torch.log(u)) ** temperature


def masked_sft_loss(
    logits: Tensor,
    targets: Tensor,
    masked: Tensor,
    p_mask: Tensor,
    supervised: Tensor,
    normalize: str = "answer_length",
) -> Tensor:
    """SFT loss over the answer: sum_{masked & supervised} CE / p_mask[row], normalised () float32.

    logits (B, L, V); targets, masked, supervised (B, L); p_mask (B,).
    normalize "answer_length" (LLaDA): each row's sum divided by its supervised length, mean over rows,
    so long and short answers weigh the same; "token" (SMDM): the batch sum divided by all supervised
    tokens, so every answer token weighs the same.
    """
    if normalize not in ("answer_length", "token"):
        raise ValueError(f"normalize={normalize!r}; valid: 'answer_length', 'token'")
    picked = masked & supervised.to(torch.bool)
    ce = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    ce[picked] = F.cross_entropy(logits[picked].float(), targets[picked], reduction="none")
    weighted = ce / p_mask.float()[:, None]
    lengths = supervised.sum(dim=1).clamp(min=1).float()
    if normalize == "answer_length":
        return (weighted.sum(dim=1) / lengths).mean()
    return weighted.sum() / lengths.sum()


@torch.no_grad()
def conditional_elbo(
    model_fn: ModelFn,
    input_ids: Tensor,
    answer: Tensor,
    mask_id: int,
    gen: torch.Generator,
    num_samples: int,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo upper bound on -log p(answer | prompt) in nats, with stratified mask counts.

    input_ids (B, L); answer (B, L) bool marks each row's answer positions (the rest is the prompt,
    never masked). LLaDA's likelihood estimator: draw a mask count l in {1..A} (A = answer length),
    mask l answer positions uniformly, and score A / l * sum_{masked} -log p(x_i | x_masked); its mean
    over l ~ U{1..A} is the ELBO. Stratified: sample j draws u_j in [j/n, (j+1)/n) and l = floor(u_j A) + 1,
    so n samples cover the mask counts evenly and each stratum carries equal probability: the mean stays
    unbiased and the variance drops.
    Returns (estimate (B,), standard error (B,)) - the error is the sample std / sqrt(n), conservative
    for a stratified design.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    answer = answer.to(torch.bool)
    lengths = answer.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("every row needs at least one answer position")
    batch = input_ids.shape[0]
    scores = []
    for j in range(num_samples):
        u = (j + torch.rand(batch, generator=gen, device=gen.device)) / num_samples
        count = (u.to(lengths.device) * lengths).floor().long().clamp(max=lengths - 1) + 1
        # A random order of each row's answer positions; the first `count` of them are masked.
        keys = torch.rand(input_ids.shape, generator=gen, device=gen.device).to(input_ids.device)
        keys = torch.where(answer, keys, 2.0)
        rank = keys.argsort(dim=1).argsort(dim=1)
        masked = answer & (rank < count[:, None])
        noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
        logits = model_fn(noisy)
        ce = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        ce[masked] = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
        scores.append(ce.sum(dim=1) * lengths.float() / count.float())
    stacked = torch.stack(scores)
    stderr = stacked.std(dim=0) / math.sqrt(num_samples) if num_samples > 1 else torch.full_like(stacked[0], math.inf)
    return stacked.mean(dim=0), stderr
