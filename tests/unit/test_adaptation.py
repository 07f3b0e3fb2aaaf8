"""Adapting an AR model to masked diffusion: attention-mask annealing (DiffuLLaMA), shifted prediction (Dream)
in training, ELBO and every decoder, and the config checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from framework.config import ConfigError
from framework.diffusion.masked import anneal_ratio, annealed_attention_mask, shift_logits
from framework.diffusion.masked_decode import DecodeConfig, decode
from framework.nn.llada import LladaModel, LladaModelConfig
from recipes.llada import objectives
from recipes.llada.recipe import LladaConfig, LladaRecipe

MASK, VOCAB = 4, 16


def tiny_model(n_layers: int = 2, causal: bool = False, seed: int = 0) -> LladaModel:
    torch.manual_seed(seed)
    cfg = LladaModelConfig(vocab_size=VOCAB, dim=32, n_layers=n_layers, n_heads=4, ffn_hidden=64, max_seq_len=64,
                           mask_id=MASK, causal=causal, init_std=0.3)
    return LladaModel(cfg).eval()


# --- attention-mask annealing -------------------------------------------------------------------------------


def test_annealed_mask_is_causal_at_zero_full_at_one_and_grows():
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.equal(annealed_attention_mask(12, 0.0, torch.Generator().manual_seed(0)), causal)
    assert bool(annealed_attention_mask(12, 1.0, torch.Generator().manual_seed(0)).all())
    masks = [annealed_attention_mask(12, r, torch.Generator().manual_seed(3)) for r in (0.0, 0.2, 0.5, 0.8, 1.0)]
    for smaller, larger in zip(masks, masks[1:]):
        assert bool((larger | ~smaller).all())  # everything attended before still is
    counts = [int(m.sum()) for m in masks]
    assert counts == sorted(counts) and counts[0] < counts[2] < counts[-1]
    # the same generator state gives the same mask (a resumed step redraws it exactly)
    again = annealed_attention_mask(12, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(again, masks[2])


def test_anneal_ratio_follows_diffullama():
    assert anneal_ratio(0, 0) == 1.0  # off: bidirectional
    assert anneal_ratio(0, 10) == pytest.approx(0.1)
    assert anneal_ratio(4, 10) == pytest.approx(0.5)
    assert anneal_ratio(9, 10) == 1.0 and anneal_ratio(50, 10) == 1.0


def test_model_attn_mask_argument_equals_the_causal_twin():
    """A bidirectional model given the causal mask computes what the same weights compute as the AR twin."""
    bi, ar = tiny_model(causal=False), tiny_model(causal=True)
    ar.load_state_dict(bi.state_dict())
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(bi(ids, attn_mask=causal), ar(ids))
        torch.testing.assert_close(bi(ids, attn_mask=causal.expand(2, 10, 10)), ar(ids))
        assert not torch.allclose(bi(ids), ar(ids))


def sft_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (4, 16), generator=g)
    return {"input_ids": ids, "prompt_len": torch.tensor([3, 5, 4, 6]), "answer_len": torch.tensor([6, 4, 8, 5])}


def run_cfg(**objective) -> LladaConfig:
    cfg = LladaConfig()
    cfg.model.mask_id = MASK
    cfg.data.kind = "sft"
    cfg.sft.random_length = True
    for k, v in objective.items():
        setattr(cfg.objective, k, v)
    return cfg


def test_annealing_starts_causal_and_ends_bidirectional_in_the_loss():
    batch = sft_batch()
    bi, ar = tiny_model(causal=False), tiny_model(causal=True)
    ar.load_state_dict(bi.state_dict())

    def loss(cfg, model, step):
        model.global_steps = step  # what the DeepSpeed engine reports: optimizer steps taken
        return objectives.masked_sft(cfg, model, batch, torch.Generator().manual_seed(7))[0]

    with torch.no_grad():
        # at step 0 of a very long anneal the mask is causal: the AR twin's attention, the same noise
        annealed = loss(run_cfg(anneal_steps=10**9), bi, 0)
        torch.testing.assert_close(annealed, loss(run_cfg(), ar, 0))
        # annealing over: exactly the plain bidirectional loss (no mask, no draw)
        assert torch.equal(loss(run_cfg(anneal_steps=10), bi, 10), loss(run_cfg(), bi, 10))
        assert not torch.allclose(loss(run_cfg(anneal_steps=10), bi, 5), loss(run_cfg(), bi, 5))


# --- shifted prediction -------------------------------------------------------------------------------------


def test_shift_logits_moves_every_output_one_to_the_right():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    out = shift_logits(logits)
    assert torch.equal(out[:, 1:], logits[:, :-1]) and torch.equal(out[:, :1], logits[:, :1])


class NextTokenOracle(torch.nn.Module):
    """Output at i is (nearly) certain of the clean token i + 1: a perfect AR head, for loss alignment only."""

    def __init__(self, clean: torch.Tensor) -> None:
        super().__init__()
        self.clean = clean

    def forward(self, ids, key_padding_mask=None, doc_ids=None, **_):
        nxt = torch.cat((self.clean[:, 1:], self.clean[:, -1:]), dim=1)
        return 30.0 * F.one_hot(nxt, VOCAB).float()


def test_shifted_loss_and_elbo_score_position_i_by_output_i_minus_1():
    batch = sft_batch(2)
    oracle = NextTokenOracle(batch["input_ids"])
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    shifted = objectives.masked_sft(run_cfg(shift=True), oracle, batch, gen())[0]
    plain = objectives.masked_sft(run_cfg(), oracle, batch, gen())[0]
    assert float(shifted) < 1e-6 < 1.0 < float(plain)
    recipe, cfg = LladaRecipe(), run_cfg(shift=True)
    cfg.model.causal = False
    assert recipe._bits_per_token(oracle, cfg, batch, gen()) < 1e-6
    assert recipe._bits_per_token(oracle, run_cfg(), batch, gen()) > 1.0


def shifted_reference(model, prompt: torch.Tensor, gen_length: int, block_length: int, steps: int,
                      threshold: float = 0.0, shift: bool = True) -> torch.Tensor:
    """Plain decoding loop of a shifted model, written from the method: full forward each step, Dream's
    cat([logits[:, :1], logits[:, :-1]]) (shift=False: LLaDA's unshifted logits), the mask token never
    predicted, confidence p / (1 - p_mask)."""
    x = torch.cat((prompt, torch.full((prompt.shape[0], gen_length), MASK)), dim=1)
    p = prompt.shape[1]
    per_block = steps // (gen_length // block_length)
    for lo in range(p, p + gen_length, block_length):
        hi = lo + block_length
        step = 0
        while bool((x[:, lo:hi] == MASK).any()):
            logits = model(x)
            if shift:
                logits = torch.cat((logits[:, :1], logits[:, :-1]), dim=1)
            logits = logits[:, lo:hi].clone()
            logits[..., MASK] = -math.inf
            probs = logits.softmax(-1)
            conf, pred = probs.max(-1)
            conf = torch.where(x[:, lo:hi] == MASK, conf, -math.inf)
            for r in range(x.shape[0]):
                if threshold:
                    take = (conf[r] >= threshold) | (torch.arange(block_length) == conf[r].argmax())
                else:
                    k = block_length // per_block + (step < block_length % per_block)
                    take = torch.zeros(block_length, dtype=torch.bool)
                    take[conf[r].topk(k).indices] = True
                take &= x[r, lo:hi] == MASK
                x[r, lo:hi] = torch.where(take, pred[r], x[r, lo:hi])
            step += 1
    return x[:, p:]


def test_shift_decoding_equals_a_plain_reference_loop():
    model = tiny_model()
    prompt = torch.randint(5, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    ones = torch.ones_like(prompt, dtype=torch.bool)
    with torch.no_grad():
        for kw in (dict(steps=12), dict(steps=6), dict(threshold=0.3)):
            cfg = DecodeConfig(gen_length=12, block_length=4, shift=True, **kw)
            got = decode(model, prompt, ones, cfg, mask_id=MASK).tokens
            want = shifted_reference(model, prompt, 12, 4, kw.get("steps", 12), kw.get("threshold", 0.0))
            assert torch.equal(got, want), kw
            plain = decode(model, prompt, ones, DecodeConfig(gen_length=12, block_length=4, **kw), mask_id=MASK)
            assert torch.equal(plain.tokens, shifted_reference(model, prompt, 12, 4, kw.get("steps", 12),
                                                               kw.get("threshold", 0.0), shift=False)), kw
            assert not torch.equal(plain.tokens, got), kw


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_shift_with_kv_cache_is_exact_for_one_layer(cache):
    """With one layer a cached column's keys depend on its own token only, so the approximate cache is exact:
    the cached decoder must then equal the uncached one, which it does only if the block's window starts one
    column early (its output predicts the block's first token)."""
    model = tiny_model(n_layers=1, seed=4)
    prompt = torch.randint(5, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[0, :2] = False  # one left-padded row
    with torch.no_grad():
        for kw in (dict(steps=16), dict(threshold=0.2)):
            plain = decode(model, prompt, mask, DecodeConfig(gen_length=16, block_length=8, shift=True, **kw),
                           mask_id=MASK).tokens
            cached = decode(model, prompt, mask, DecodeConfig(gen_length=16, block_length=8, shift=True,
                                                               cache=cache, **kw), mask_id=MASK).tokens
            assert torch.equal(cached, plain), kw


def test_shift_decoding_needs_a_prompt():
    with pytest.raises(ValueError, match="prompt of at least one token"):
        decode(tiny_model(), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool),
               DecodeConfig(gen_length=4, block_length=4, steps=4, shift=True), mask_id=MASK)


# --- config checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", [dict(anneal_steps=10), dict(shift=True)])
def test_adaptation_options_refuse_the_ar_twin(objective):
    recipe = LladaRecipe()
    cfg = run_cfg(**objective)
    recipe.validate(cfg, 1)  # the masked model takes them
    ar = run_cfg(**objective)
    ar.model.causal, ar.objective.name = True, "autoregressive"
    with pytest.raises(ConfigError, match="objective.anneal_steps.*model.causal=false"):
        recipe.validate(ar, 1)
    causal_only = run_cfg(**objective)
    causal_only.model.causal = True
    with pytest.raises(ConfigError):
        recipe.validate(causal_only, 1)
    with pytest.raises(ConfigError, match="anneal_steps=-1"):
        recipe.validate(run_cfg(anneal_steps=-1), 1)
