"""Parallel-unmasking decoders: LLaDA oracle, batched == row by row, threshold and cache equivalences."""

import math

import pytest
import torch
import torch.nn.functional as F

from framework.diffusion.masked_decode import (
    DecodeConfig,
    decode,
    decode_autoregressive,
    generated_lengths,
    left_pad_positions,
)
from framework.nn.llada import LladaModel, LladaModelConfig

MASK = 3


class TableModel:
    """Deterministic toy denoiser: logits depend on position and the tokens seen; records its inputs."""

    def __init__(self, vocab: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pos_table = torch.randn(64, vocab, generator=g)
        self.tok_table = torch.randn(vocab, vocab, generator=g)
        # LLaDA's generate.py may commit the mask token itself (the position then stays masked); ours
        # never predicts it. A table that never prefers it makes the two comparable.
        self.pos_table[:, MASK] = -10.0
        self.tok_table[:, MASK] = 0.0
        self.inputs: list[torch.Tensor] = []

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        context = self.tok_table[x].mean(dim=1, keepdim=True)  # every position sees all tokens
        return 3.0 * (self.pos_table[: x.shape[1]] + context)

    def __call__(self, x, key_padding_mask=None, *, positions=None, past=None, return_cache=False,
                 logits_range=None):
        assert past is None, "TableModel has no cache"
        self.inputs.append(x.clone())
        logits = self.logits(x)
        if logits_range is not None:
            logits = logits[:, logits_range[0]:logits_range[1]]
        return (logits, None) if return_cache else logits


def run(model, prompt, eos_id=None, mask=None, **cfg):
    mask = torch.ones_like(prompt, dtype=torch.bool) if mask is None else mask
    return decode(model, prompt, mask, DecodeConfig(**cfg), mask_id=MASK, eos_id=eos_id)


def llada_reference_generate(model, prompt, steps, gen_length, block_length, mask_id):
    """Transcription of LLaDA's generate.py (cfg_scale=0, temperature 0, low_confidence) as the oracle."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, lo : lo + block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        transfer = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
        for i in range(mask_num.size(0)):
            transfer[i, : mask_num[i] % steps] += 1
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.gather(p, dim=-1, index=x0[..., None]).squeeze(-1)
            x0_p[:, lo + block_length :] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = torch.topk(confidence[j], k=int(transfer[j, i]))
                transfer_index[j, select] = True
            x[transfer_index] = x0[transfer_index]
    return x


def test_matches_llada_reference():
    prompt = torch.tensor([[5, 6, 7], [1, 2, 0]])
    table = TableModel()
    ref = llada_reference_generate(table.logits, prompt, 6, 12, 4, MASK)
    ours = run(TableModel(), prompt, gen_length=12, steps=6, block_length=4)
    assert torch.equal(ours.tokens, ref[:, 3:])
    assert ours.forwards == 6


def test_one_token_per_step_and_no_mask_left():
    model = TableModel()
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = run(model, prompt, gen_length=8, steps=8, block_length=8)
    assert out.tokens.shape == (2, 8) and len(model.inputs) == 8
    masks_seen = [(x[:, 3:] == MASK).sum(dim=1).tolist() for x in model.inputs]
    assert masks_seen == [[8 - s, 8 - s] for s in range(8)]
    assert not (out.tokens == MASK).any()


def test_semi_autoregressive_over_blocks():
    model = TableModel()
    run(model, torch.tensor([[5, 6]]), gen_length=12, steps=6, block_length=4)
    assert len(model.inputs) == 6
    for call, x in enumerate(model.inputs):
        block = call // 2
        assert (x[0, 2 + 4 * (block + 1):] == MASK).all()  # later blocks stay masked
        assert not (x[0, 2:2 + 4 * block] == MASK).any()  # earlier blocks are done


def test_temperature_sampling_is_seeded():
    prompt = torch.tensor([[5, 6, 7]])

    def sample(seed):
        cfg = DecodeConfig(gen_length=8, steps=4, block_length=4, temperature=1.0)
        mask = torch.ones_like(prompt, dtype=torch.bool)
        return decode(TableModel(), prompt, mask, cfg, mask_id=MASK, gen=torch.Generator().manual_seed(seed)).tokens

    assert torch.equal(sample(1), sample(1))
    assert any(not torch.equal(sample(1), sample(s)) for s in range(2, 6))


def test_stops_at_eos_and_pads_with_it():
    eos = 11

    class EosFirst(TableModel):
        def logits(self, x):
            logits = torch.zeros(*x.shape, 12)
            logits[..., eos] = 5.0 - 0.1 * torch.arange(x.shape[1])  # earliest position most confident
            return logits

    model = EosFirst()
    out = run(model, torch.tensor([[5, 6]]), eos_id=eos, gen_length=8, steps=8, block_length=8)
    assert len(model.inputs) == 1 and (out.tokens == eos).all()
    assert generated_lengths(out.tokens, eos).tolist() == [1]


def test_rejects_bad_block_split():
    with pytest.raises(ValueError, match="block_length"):
        DecodeConfig(gen_length=10, steps=5, block_length=4)
    with pytest.raises(ValueError, match="number of blocks"):
        DecodeConfig(gen_length=8, steps=3, block_length=4)


def test_left_pad_positions_start_at_zero():
    mask = torch.tensor([[False, False, True], [True, True, True]])
    key_mask, pos = left_pad_positions(mask, 2)
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert key_mask[:, 3:].all() and key_mask[0].tolist() == [False, False, True, True, True]


# ------------------------------------------------------------------------------------------
# Real tiny transformer: batching, cache and threshold equivalences


def tiny_model(causal: bool = False, seed: int = 0) -> LladaModel:
    torch.manual_seed(seed)
    cfg = LladaModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=64,
                           mask_id=MASK, causal=causal, init_std=0.3)
    return LladaModel(cfg).eval()


PROMPTS = [[7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def left_padded(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


def batched_equals_rows(decoder):
    ids, mask = left_padded(PROMPTS)
    batched = decoder(ids, mask)
    for row, prompt in enumerate(PROMPTS):
        single = decoder(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool))
        assert torch.equal(batched[row], single[0]), f"row {row}: {batched[row].tolist()} vs {single[0].tolist()}"
    return batched


def common_eos(model, **cfg):
    """An EOS id the model actually emits early in row 0, so per-row stopping is exercised."""
    ids, mask = left_padded(PROMPTS)
    out = decode(model, ids, mask, DecodeConfig(**cfg), mask_id=MASK).tokens
    return int(out[0, 2])


DECODERS = {
    "reference": dict(gen_length=16, block_length=8, steps=16),
    "reference_2_per_step": dict(gen_length=16, block_length=8, steps=8),
    "threshold": dict(gen_length=16, block_length=8, threshold=0.2),
    "threshold_prefix_cache": dict(gen_length=16, block_length=8, threshold=0.2, cache="prefix"),
    "threshold_dual_cache": dict(gen_length=16, block_length=8, threshold=0.2, cache="dual"),
    "cfg": dict(gen_length=16, block_length=8, steps=16, cfg_scale=2.5),  # LLaDA's w = 1.5
}


@pytest.mark.parametrize("name", DECODERS)
def test_batched_left_padded_equals_row_by_row(name):
    model = tiny_model()
    cfg = DecodeConfig(**DECODERS[name])
    eos = common_eos(model, **DECODERS[name])
    out = batched_equals_rows(lambda ids, mask: decode(model, ids, mask, cfg, mask_id=MASK, eos_id=eos).tokens)
    assert not (out == MASK).any()
    lengths = generated_lengths(out, eos)
    assert lengths[0] <= 3 and (out[0, lengths[0]:] == eos).all()


def test_autoregressive_batched_equals_row_by_row_and_uncached_greedy():
    model = tiny_model(causal=True)
    ids, mask = left_padded(PROMPTS)
    eos = int(decode_autoregressive(model, ids, mask, 12).tokens[1, 4])
    out = batched_equals_rows(lambda i, m: decode_autoregressive(model, i, m, 12, eos_id=eos).tokens)
    for row, prompt in enumerate(PROMPTS):  # the KV cache changes nothing: recompute everything per token
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == eos:
                break
        answer = seq[len(prompt):]
        assert out[row, :len(answer)].tolist() == answer
    assert generated_lengths(out, eos)[1] <= 5


def test_threshold_above_one_equals_one_token_per_step_reference():
    model = tiny_model(seed=1)
    ids, mask = left_padded(PROMPTS)
    ref = decode(model, ids, mask, DecodeConfig(gen_length=16, block_length=8, steps=16), mask_id=MASK)
    thr = decode(model, ids, mask, DecodeConfig(gen_length=16, block_length=8, threshold=1.01), mask_id=MASK)
    assert torch.equal(ref.tokens, thr.tokens) and ref.forwards == thr.forwards == 16


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_uncached(cache):
    model = tiny_model(seed=2)
    ids, mask = left_padded(PROMPTS)
    base = dict(gen_length=16, block_length=8, threshold=0.3)
    plain = decode(model, ids, mask, DecodeConfig(**base), mask_id=MASK)
    cached = decode(model, ids, mask, DecodeConfig(**base, cache=cache, refresh_every=1), mask_id=MASK)
    assert torch.equal(plain.tokens, cached.tokens)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fresh_cache_gives_the_full_forward_logits(cache):
    """Right after a refresh the cached path computes exactly what the full forward does."""
    model = tiny_model(seed=3)
    ids, mask = left_padded(PROMPTS)
    ids = torch.cat((ids, torch.randint(5, 40, (3, 16))), dim=1)
    key_mask, pos = left_pad_positions(mask, 16)
    lo, hi = ids.shape[1] - 16, ids.shape[1] - 8
    with torch.no_grad():
        full, kv = model(ids, key_mask, positions=pos, return_cache=True)
        outside = torch.ones(ids.shape[1], dtype=torch.bool)
        outside[lo:] = False
        if cache == "dual":
            outside[hi:] = True
        end = hi if cache == "dual" else ids.shape[1]
        part = model(ids[:, lo:end], key_mask[:, lo:end], positions=pos[:, lo:end], past=kv.columns(outside),
                     logits_range=(0, hi - lo))
    torch.testing.assert_close(part, full[:, lo:hi], atol=1e-5, rtol=1e-5)


def test_cache_without_refresh_runs_fewer_full_forwards_and_still_decodes():
    model = tiny_model(seed=4)
    ids, mask = left_padded(PROMPTS)
    out = decode(model, ids, mask, DecodeConfig(gen_length=16, block_length=8, steps=16, cache="dual"),
                 mask_id=MASK)
    assert out.forwards == 16 and not (out.tokens == MASK).any()


def test_cfg_changes_the_answer():
    model = tiny_model(seed=5)
    ids, mask = left_padded(PROMPTS)
    plain = decode(model, ids, mask, DecodeConfig(gen_length=16, block_length=8, steps=16), mask_id=MASK)
    guided = decode(model, ids, mask, DecodeConfig(gen_length=16, block_length=8, steps=16, cfg_scale=4.0),
                    mask_id=MASK)
    assert not torch.equal(plain.tokens, guided.tokens)


def test_random_remasking_is_seeded_and_completes():
    model = tiny_model(seed=6)
    ids, mask = left_padded(PROMPTS)
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=8, remasking="random")

    def run_seed(seed):
        return decode(model, ids, mask, cfg, mask_id=MASK, gen=torch.Generator().manual_seed(seed)).tokens

    first = run_seed(0)
    assert torch.equal(first, run_seed(0)) and not (first == MASK).any()
    low_conf = decode(model, ids, mask, DecodeConfig(gen_length=16, block_length=8, steps=8), mask_id=MASK).tokens
    assert any(not torch.equal(run_seed(s), low_conf) for s in range(4))  # the order of commits matters
