"""LLaDA masked diffusion: mask ratios, forward masking, loss, ELBO (decoders: test_masked_decode.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from framework.diffusion.masked import (
    elbo_bits_per_token,
    forward_mask,
    masked_diffusion_loss,
    num_transfer_tokens,
    random_length_crop,
    sample_mask_ratio,
)

MASK = 3


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_loss_hand_computed():
    # Position 1 is masked: softmax([0, 0, ln 2])[2] = 2 / 4, so CE = ln 2; weight 1 / p_mask = 2;
    # divided by B * L = 2. Position 0 is unmasked and its (bad) logits must not count.
    logits = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)]]])
    targets = torch.tensor([[2, 2]])
    masked = torch.tensor([[False, True]])
    loss = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.5]))
    expected = math.log(2.0) / 0.5 / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(0.693147, rel=1e-5)


def test_loss_respects_loss_mask_and_row_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    targets = torch.randint(0, 5, (2, 4))
    masked = torch.tensor([[True, True, False, True], [True, False, True, True]])
    loss_mask = torch.tensor([[True, False, True, True], [True, True, True, False]])
    p_mask = torch.tensor([0.25, 0.8])
    ce = F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1), reduction="none").view(2, 4)
    w = (masked & loss_mask).float() / p_mask[:, None]
    expected = (ce * w).sum() / 8
    loss = masked_diffusion_loss(logits.bfloat16(), targets, masked, p_mask, loss_mask)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    assert loss.dtype == torch.float32


def test_sample_mask_ratio_range_and_determinism():
    p = sample_mask_ratio(1000, gen(1), eps=0.1)
    assert p.shape == (1000,) and p.min() >= 0.1 and p.max() <= 1.0
    torch.testing.assert_close(p, sample_mask_ratio(1000, gen(1), eps=0.1))


def test_antithetic_t_is_stratified():
    batch, eps = 16, 1e-3
    t = (sample_mask_ratio(batch, gen(2), eps=eps, antithetic=True) - eps) / (1 - eps)
    strata = torch.floor(t * batch).long().sort().values
    # one t in each interval [i / B, (i + 1) / B): the batch spans the whole range
    assert torch.equal(strata, torch.arange(batch))
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / batch), atol=1e-5, rtol=0)


def test_forward_mask_rate_and_maskable():
    ids = torch.randint(5, 100, (64, 512), generator=gen(3))
    p_mask = torch.linspace(0.05, 0.95, 64)
    noisy, masked = forward_mask(ids, p_mask, MASK, gen(4))
    assert torch.equal(noisy == MASK, masked)
    assert torch.equal(noisy[~masked], ids[~masked])
    rate = masked.float().mean(dim=1)
    assert (rate - p_mask).abs().max() < 0.08  # 4+ sigma at L=512
    assert abs(rate.mean() - p_mask.mean()) < 0.01

    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 200:] = True  # prompt = first 200 tokens
    noisy, masked = forward_mask(ids, torch.full((64,), 0.99), MASK, gen(5), maskable=maskable)
    assert not masked[:, :200].any() and torch.equal(noisy[:, :200], ids[:, :200])
    assert masked[:, 200:].float().mean() > 0.97


def test_random_length_crop_fraction_and_shape():
    keep = random_length_crop(20000, 32, gen(6), prob=0.1)
    cropped = ~keep.all(dim=1)
    # rows that drew length == L look uncropped: expected fraction 0.1 * 31 / 32
    assert abs(cropped.float().mean().item() - 0.1 * 31 / 32) < 0.01
    assert keep[:, 0].all()  # every row keeps at least one token
    assert torch.equal(keep, keep.cummin(dim=1).values)  # kept positions form a prefix


def test_random_length_crop_never_whole_batch_at_one_percent():
    for seed in range(50):
        keep = random_length_crop(64, 128, gen(seed), prob=0.01)
        assert (~keep.all(dim=1)).sum() < 64 // 2


def test_num_transfer_tokens_even_split_remainder_first():
    out = num_transfer_tokens(torch.tensor([10, 4, 0]), 4)
    assert out.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]


def test_elbo_of_uniform_model_is_log2_vocab():
    vocab = 16
    ids = torch.randint(0, vocab, (4, 32), generator=gen(7))

    def uniform(x):
        return torch.zeros(*x.shape, vocab)

    bits = elbo_bits_per_token(uniform, ids, MASK, gen(8), num_samples=200)
    assert bits.item() == pytest.approx(math.log2(vocab), rel=0.1)


def test_elbo_of_oracle_is_near_zero():
    ids = torch.randint(0, 16, (4, 32), generator=gen(9))

    def oracle(x):
        return F.one_hot(ids, 16).float() * 50.0

    assert elbo_bits_per_token(oracle, ids, MASK, gen(10), num_samples=4).item() < 1e-6


def exact_conditional_elbo(model, ids, answer_cols):
    """The ELBO by enumeration: mean over l of the mean over all l-subsets S of A / l * sum_S -log p."""
    import itertools

    a = len(answer_cols)
    total = 0.0
    for count in range(1, a + 1):
        subsets = list(itertools.combinations(answer_cols, count))
        for subset in subsets:
            noisy = ids.clone()
            noisy[0, list(subset)] = MASK
            logp = F.log_softmax(model(noisy)[0].double(), dim=-1)
            nll = -sum(logp[i, ids[0, i]].item() for i in subset)
            total += a / count * nll / len(subsets) / a
    return total


@pytest.mark.parametrize("answer_cols", [[2, 3, 4, 5], [4, 5]])
def test_conditional_elbo_is_unbiased_against_enumeration(answer_cols):
    from framework.diffusion.masked import conditional_elbo
    from framework.nn.llada import LladaModel, LladaModelConfig

    torch.manual_seed(0)
    model = LladaModel(LladaModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=2, ffn_hidden=32,
                                        max_seq_len=8, mask_id=MASK, init_std=0.5)).eval()
    ids = torch.tensor([[5, 6, 7, 1, 2, 0]])
    exact = exact_conditional_elbo(model, ids, answer_cols)
    repeats, samples = 2000, 3
    answer = torch.zeros(repeats, 6, dtype=torch.bool)
    answer[:, answer_cols] = True
    with torch.no_grad():
        est, stderr = conditional_elbo(model, ids.expand(repeats, 6), answer, MASK, gen(12), samples)
    spread = est.std().item()
    # Unbiased: the mean of many independent estimates sits within 4 of its own standard errors.
    assert abs(est.mean().item() - exact) < 4 * spread / math.sqrt(repeats), (est.mean().item(), exact)
    # The estimator's reported error is of the size of its real spread (conservative under stratification).
    assert 0.7 * spread < stderr.mean().item() < 3 * spread
    assert exact > 0


def test_conditional_elbo_never_masks_the_prompt_and_rejects_empty_answers():
    from framework.diffusion.masked import conditional_elbo

    seen = []

    def record(x):
        seen.append(x.clone())
        return torch.zeros(*x.shape, 8)

    ids = torch.tensor([[5, 6, 7, 1, 2, 0]])
    answer = torch.tensor([[False, False, False, True, True, True]])
    conditional_elbo(record, ids, answer, MASK, gen(1), 6)
    assert all(torch.equal(x[:, :3], ids[:, :3]) for x in seen)
    assert [int((x == MASK).sum()) for x in seen] == [1, 1, 2, 2, 3, 3]  # strata cover counts 1..3 evenly
    with pytest.raises(ValueError, match="answer position"):
        conditional_elbo(record, ids, torch.zeros_like(answer), MASK, gen(1), 2)


def test_masked_sft_loss_normalisations():
    from framework.diffusion.masked import masked_sft_loss

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    masked = torch.tensor([[False, True, True, False, True], [False, False, True, True, True]])
    supervised = torch.tensor([[False, True, True, True, True], [False, False, False, True, True]])
    p = torch.tensor([0.5, 0.25])
    ce = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="none").view(2, 5)
    w = ce * (masked & supervised) / p[:, None]
    per_row = masked_sft_loss(logits, targets, masked, p, supervised, "answer_length")
    torch.testing.assert_close(per_row, (w[0].sum() / 4 + w[1].sum() / 2) / 2)
    per_token = masked_sft_loss(logits, targets, masked, p, supervised, "token")
    torch.testing.assert_close(per_token, w.sum() / 6)
