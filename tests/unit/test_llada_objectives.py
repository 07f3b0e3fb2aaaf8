"""LLaDA recipe objectives: SFT never masks the prompt, padding policy, prompt dropout, the AR twin's loss."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from recipes.llada import objectives

MASK, EOS = 4, 2


def cfg(**sft):
    return SimpleNamespace(
        model=SimpleNamespace(mask_id=MASK),
        objective=SimpleNamespace(eps=1e-3, antithetic=False),
        data=SimpleNamespace(doc_attention=False),
        sft=SimpleNamespace(**{"supervise_padding": True, "normalize": "answer_length", "prompt_dropout": 0.0,
                               "random_length": False, **sft}),
    )


def batch():
    # prompt lengths 3 and 5, answers of 2 and 1 real tokens + their first EOS, EOS padding to 10
    ids = torch.tensor([[10, 11, 12, 20, 21, EOS, EOS, EOS, EOS, EOS],
                        [13, 14, 15, 16, 17, 22, EOS, EOS, EOS, EOS]])
    return {"input_ids": ids, "prompt_len": torch.tensor([3, 5]), "answer_len": torch.tensor([3, 2])}


class Recorder(torch.nn.Module):
    def __init__(self, vocab=32):
        super().__init__()
        self.vocab, self.inputs, self.masks = vocab, [], []
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, ids, key_padding_mask=None, **_):
        self.inputs.append(ids.clone())
        self.masks.append(key_padding_mask)
        return torch.zeros(*ids.shape, self.vocab) + self.bias


def test_sft_never_masks_the_prompt_and_masks_the_answer():
    b, model = batch(), Recorder()
    for seed in range(40):
        objectives.masked_sft(cfg(), model, b, torch.Generator().manual_seed(seed))
    seen = torch.stack(model.inputs)  # (runs, B, L)
    answer, _ = objectives.sft_regions(b, True)
    assert torch.equal(seen[:, ~answer], b["input_ids"][~answer].expand(40, -1))  # prompts intact, always
    assert (seen[:, answer] == MASK).float().mean() > 0.3  # answers (and padding) get masked
    assert (seen[:, 1, 9] == MASK).any()  # padding is maskable too, as at decoding


def test_supervise_padding_policy():
    b = batch()
    answer, with_pad = objectives.sft_regions(b, True)
    _, without_pad = objectives.sft_regions(b, False)
    assert torch.equal(with_pad, answer)
    assert without_pad.sum(dim=1).tolist() == [3, 2]  # answer tokens and the first EOS only
    assert without_pad[0, 3:6].all() and not without_pad[0, 6:].any()


def test_prompt_dropout_masks_whole_prompts_only():
    b, model = batch(), Recorder()
    for seed in range(60):
        objectives.masked_sft(cfg(prompt_dropout=0.5), model, b, torch.Generator().manual_seed(seed))
    prompts = torch.stack([x[0, :3] for x in model.inputs])
    dropped = (prompts == MASK).all(dim=1)
    kept = (prompts == b["input_ids"][0, :3]).all(dim=1)
    assert bool((dropped | kept).all())  # all or nothing
    assert 10 < int(dropped.sum()) < 50


def test_autoregressive_loss_is_next_token_ce_on_the_answer():
    b = batch()
    torch.manual_seed(0)
    logits = torch.randn(2, 10, 32)

    class Fixed(torch.nn.Module):
        def forward(self, ids, **_):
            return logits

    for pad in (True, False):
        loss, _ = objectives.autoregressive(cfg(supervise_padding=pad), Fixed(), b, None)
        sup = objectives.sft_regions(b, pad)[1][:, 1:]
        expected = F.cross_entropy(logits[:, :-1][sup], b["input_ids"][:, 1:][sup])
        torch.testing.assert_close(loss, expected)
    # pretraining batches (no prompt_len): every next token
    loss, _ = objectives.autoregressive(cfg(), Fixed(), {"input_ids": b["input_ids"]}, None)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 32), b["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("normalize", ["answer_length", "token"])
def test_sft_loss_is_finite_and_has_gradients(normalize):
    model = Recorder()
    loss, metrics = objectives.masked_sft(cfg(normalize=normalize), model, batch(), torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and model.bias.grad.abs().sum() > 0 and 0 < metrics["mask_rate"] <= 1


def test_random_length_hides_a_tail_of_the_padding_from_attention_and_loss():
    from framework.nn.llada import LladaModel, LladaModelConfig

    b, recorder = batch(), Recorder()
    for seed in range(200):
        objectives.masked_sft(cfg(random_length=True), recorder, b, torch.Generator().manual_seed(seed))
    lengths = torch.stack([m.sum(dim=1) for m in recorder.masks])  # (runs, B) visible lengths
    lo = b["prompt_len"] + b["answer_len"]
    assert torch.equal(lengths.min(0).values, lo) and (lengths.max(0).values == 10).all()  # both ends reached
    assert all(torch.equal(m, torch.arange(10)[None, :] < n[:, None]) for m, n in zip(recorder.masks, lengths))
    # A real model: what lies past a row's visible length changes neither its logits nor the loss.
    torch.manual_seed(0)
    model = LladaModel(LladaModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, ffn_hidden=64,
                                        max_seq_len=16, mask_id=MASK))
    other = dict(b, input_ids=b["input_ids"].clone())
    other["input_ids"][:, -1] = 30  # always hidden unless a row keeps all 10 positions
    compared = 0
    for seed in range(20):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        visible = objectives.random_visible(b, torch.Generator().manual_seed(seed))
        loss, _ = objectives.masked_sft(cfg(random_length=True), model, b, g1)
        loss_other, _ = objectives.masked_sft(cfg(random_length=True), model, other, g2)
        if not visible[:, -1].any():
            torch.testing.assert_close(loss, loss_other)
            compared += 1
    assert compared >= 5
