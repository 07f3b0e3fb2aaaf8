"""Block diffusion (framework/diffusion/block_diffusion.py, block_decode.py, the recipe's objective): the BD3-LM
mask keeps a token's logits independent of later blocks, cached decoding equals uncached, a left-padded batch
equals row by row (EOS exits included), and the loss reads masked tokens only."""

from __future__ import annotations

import pytest
import torch

from framework.config import from_dict
from framework.data.sft import left_pad_prompts
from framework.diffusion.block_decode import BlockDecodeConfig, block_decode, pipeline_commit
from framework.diffusion.block_diffusion import (
    bd3lm_mask,
    block_diffusion_loss,
    block_noise_levels,
    mask_tokens,
)
from framework.nn.llada import LladaModel, LladaModelConfig
from recipes.llada import objectives
from recipes.llada.recipe import LladaConfig

MASK = 4
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], list(range(20, 32)), [40, 41, 42, 43, 44, 45, 46, 47]]


@pytest.fixture(scope="module")
def model() -> LladaModel:
    # A large init gives peaked, varied predictions, so thresholds and quotas both decide some commits.
    torch.manual_seed(0)
    cfg = LladaModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, ffn_hidden=128, max_seq_len=128,
                           mask_id=MASK, init_std=0.3)
    return LladaModel(cfg).eval()


def bd_config(block_size: int = 4, **overrides) -> LladaConfig:
    cfg = from_dict(LladaConfig, {"objective": {"name": "block_diffusion", "block_size": block_size}, **overrides})
    cfg.model.mask_id = MASK
    return cfg


def test_training_forward_logits_ignore_later_blocks(model):
    cfg, bs, length = bd_config(), 4, 16
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(5, 64, (2, length), generator=gen)
    noisy, _ = mask_tokens(clean, torch.full((2, length), 0.5), MASK, gen)
    with torch.no_grad():
        base = objectives.block_logits(cfg, model, noisy, clean)
        later = slice(2 * bs, length)  # blocks 2 and 3 change in both the noised and the clean copy
        noisy2, clean2 = noisy.clone(), clean.clone()
        noisy2[:, later] = torch.randint(5, 64, (2, length - 2 * bs), generator=gen)
        clean2[:, later] = torch.randint(5, 64, (2, length - 2 * bs), generator=gen)
        changed = objectives.block_logits(cfg, model, noisy2, clean2)
    torch.testing.assert_close(changed[:, :2 * bs], base[:, :2 * bs], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 2 * bs:], base[:, 2 * bs:])
    # ... and a noised block sees its own block whole (a change inside block 1 moves all of block 1)
    noisy3 = noisy.clone()
    noisy3[:, bs + 3] = 7 if int(noisy[0, bs + 3]) != 7 else 8
    with torch.no_grad():
        inside = objectives.block_logits(cfg, model, noisy3, clean)
    assert not torch.allclose(inside[:, bs], base[:, bs])


def test_bd3lm_mask_layout():
    m = bd3lm_mask(6, 2)
    noised, clean = slice(0, 6), slice(6, 12)
    blocks = torch.arange(6) // 2
    assert torch.equal(m[noised, noised], blocks[:, None] == blocks[None, :])
    assert torch.equal(m[noised, clean], blocks[None, :] < blocks[:, None])
    assert torch.equal(m[clean, clean], blocks[None, :] <= blocks[:, None])
    assert not m[clean, noised].any()


@pytest.mark.parametrize("threshold,steps", [(0.3, 2), (0.9, 4), (1.0, 3)])
def test_cached_decoding_equals_uncached(model, threshold, steps):
    ids, mask = left_pad_prompts(PROMPTS, 0)
    cfg = BlockDecodeConfig(gen_length=10, block_size=4, steps=steps, threshold=threshold)
    cached = block_decode(model, ids, mask, cfg, mask_id=MASK)
    uncached = block_decode(model, ids, mask, BlockDecodeConfig(**{**cfg.__dict__, "cache": False}), mask_id=MASK)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.forwards == uncached.forwards and cached.committed == uncached.committed
    assert len({tuple(r) for r in cached.tokens.tolist()}) == len(PROMPTS)  # prompts matter


def test_batched_equals_row_by_row_with_eos_exits(model):
    cfg = BlockDecodeConfig(gen_length=12, block_size=4, steps=4, threshold=0.5)
    ids, mask = left_pad_prompts(PROMPTS, 0)
    eos = int(block_decode(model, ids, mask, cfg, mask_id=MASK).tokens[1, 2])  # a token row 1 makes early
    batched = block_decode(model, ids, mask, cfg, mask_id=MASK, eos_id=eos)
    rows = [block_decode(model, *left_pad_prompts([p], 0), cfg, mask_id=MASK, eos_id=eos) for p in PROMPTS]
    assert torch.equal(batched.tokens, torch.cat([r.tokens for r in rows]))
    assert (batched.tokens[1, 2:] == eos).all()  # row 1 left at its EOS; the others went on
    assert max(r.forwards for r in rows) <= batched.forwards < sum(r.forwards for r in rows)


def test_lockstep_makes_the_same_forwards_for_any_prompt_lengths(model):
    cfg = BlockDecodeConfig(gen_length=8, block_size=4, steps=2, threshold=1.0, lockstep=True)
    counts = {block_decode(model, *left_pad_prompts([p], 0), cfg, mask_id=MASK).forwards for p in PROMPTS}
    assert counts == {2 * (8 // 4 + 1)}


def test_pipeline_commit_rule():
    conf = torch.tensor([[0.9, 0.8, 0.1, 0.95], [0.2, 0.3, 0.1, 0.05]])
    active = torch.tensor([[True, True, True, False], [True, True, True, True]])
    got = pipeline_commit(conf, active, quota=2, threshold=0.5)
    # row 0: two active above 0.5 -> exactly those; row 1: none -> its 2 most confident
    assert got.tolist() == [[True, True, False, False], [True, True, False, False]]


def test_loss_reads_masked_tokens_only():
    gen = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 32, (3, 16), generator=gen)
    p = block_noise_levels(3, 16, 4, gen)
    assert torch.equal(p.view(3, 4, 4), p.view(3, 4, 4)[:, :, :1].expand(3, 4, 4))  # one level per block
    _, masked = mask_tokens(targets, p, MASK, gen)
    assert masked.any() and not masked.all()
    logits = torch.randn(3, 16, 32, generator=gen, requires_grad=True)
    block_diffusion_loss(logits, targets, masked, p).backward()
    grads = logits.grad.abs().sum(-1)
    assert (grads[masked] > 0).all() and (grads[~masked] == 0).all()
    supervised = torch.zeros_like(masked)
    supervised[:, 8:] = True
    logits.grad = None
    block_diffusion_loss(logits, targets, masked, p, supervised, "answer_length").backward()
    grads = logits.grad.abs().sum(-1)
    assert (grads[masked & supervised] > 0).all() and (grads[~(masked & supervised)] == 0).all()


def test_objective_trains_masked_answer_tokens_only(model):
    cfg = bd_config(sft={"random_length": False})
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 64, (2, 16), generator=gen)
    batch = {"input_ids": ids, "prompt_len": torch.tensor([5, 7]), "answer_len": torch.tensor([9, 9])}
    seen = {}

    def spy(x, *args, **kwargs):  # the real model; records which inputs were masked
        seen["input"] = x
        return model(x, *args, **kwargs)

    loss, _ = objectives.block_diffusion(cfg, spy, batch, gen)
    noised = seen["input"][:, :16]
    assert torch.equal(seen["input"][:, 16:], ids)  # the clean copy
    masked = noised == MASK
    assert masked.any() and not masked[0, :5].any() and not masked[1, :7].any()  # prompts stay clean
    assert loss.item() > 0 and loss.requires_grad


@pytest.mark.parametrize("overrides,named", [({"objective": {"name": "block_diffusion"}}, "objective.block_size"),
                                             ({"objective": {"block_size": 8}}, "objective.block_size"),
                                             ({"objective": {"name": "block_diffusion", "block_size": 8,
                                                             "shift": True}}, "objective.shift")])
def test_config_errors_name_the_key(overrides, named):
    from framework.config import ConfigError
    from recipes.llada.recipe import LladaRecipe

    with pytest.raises(ConfigError, match=named):
        LladaRecipe().validate(from_dict(LladaConfig, overrides), world=1)


def test_recipe_sampling_decodes_a_block_diffusion_run_with_the_block_decoder(model):
    from recipes.llada.decoding import block_decode_config, generate_answers

    cfg = bd_config(sample={"gen_length": 12, "steps": 12, "threshold": 0.5, "batch_size": 4})
    answers, forwards = generate_answers(model, cfg, PROMPTS, eos_id=2, pad_id=0, device=torch.device("cpu"))
    dcfg = block_decode_config(cfg.sample, 4)
    assert (dcfg.block_size, dcfg.steps, dcfg.threshold) == (4, 4, 0.5)
    out = block_decode(model, *left_pad_prompts(PROMPTS, 0), dcfg, mask_id=MASK, eos_id=2)
    assert answers == [r[: r.index(2)] if 2 in r else r for r in out.tokens.tolist()]
    assert forwards == out.forwards
