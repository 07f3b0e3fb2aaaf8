"""`sample.confidence`: "full" reproduces LLaDA's generate.py (low-confidence remasking on the full softmax)
token for token, "without_mask" (p / (1 - p_mask)) is the earlier convention; imported LLaDA checkpoints
default to full, this framework's own runs keep without_mask."""

import math

import pytest
import torch
from test_llada_layout import llama, write_folder
from test_masked_decode import MASK, TableModel, llada_reference_generate

from framework.diffusion.masked_decode import DecodeConfig, decode
from tests.runs import TINY


class MaskHeavy(TableModel):
    """The table model with a mask logit just below each position's best token, by a position-dependent
    margin: p_mask takes up to about half the mass, unevenly, so the two confidences rank positions
    differently; the mask is never the argmax, so generate.py never commits it (the decoders agree on it)."""

    def __init__(self) -> None:
        super().__init__(seed=3)
        self.margin = 0.05 + 4.0 * torch.rand(64, generator=torch.Generator().manual_seed(7))

    def logits(self, x):
        logits = super().logits(x)
        best = logits.clone()
        best[..., MASK] = -math.inf
        logits[..., MASK] = best.max(dim=-1).values - self.margin[: x.shape[1]]
        return logits


def without_mask(logits_fn):
    """generate.py run on logits whose mask entry is -inf: its softmax is then p / (1 - p_mask)."""
    def wrapped(x):
        logits = logits_fn(x).clone()
        logits[..., MASK] = -math.inf
        return logits
    return wrapped


def ours(prompt, confidence):
    cfg = DecodeConfig(gen_length=12, steps=6, block_length=4, confidence=confidence)
    return decode(MaskHeavy(), prompt, torch.ones_like(prompt, dtype=torch.bool), cfg, mask_id=MASK).tokens


def test_full_confidence_reproduces_generate_py_and_differs_from_without_mask():
    prompt = torch.tensor([[5, 6, 7], [1, 2, 0], [8, 9, 10]])
    table = MaskHeavy()
    full_ref = llada_reference_generate(table.logits, prompt, 6, 12, 4, MASK)[:, 3:]
    renorm_ref = llada_reference_generate(without_mask(table.logits), prompt, 6, 12, 4, MASK)[:, 3:]
    assert not (full_ref == MASK).any()  # the oracle never committed the mask token
    assert torch.equal(ours(prompt, "full"), full_ref)
    assert torch.equal(ours(prompt, "without_mask"), renorm_ref)
    assert not torch.equal(full_ref, renorm_ref)  # the conventions pick different tokens here


def test_bad_confidence_is_refused():
    with pytest.raises(ValueError, match="confidence='softmax'"):
        DecodeConfig(gen_length=8, steps=8, block_length=8, confidence="softmax")


def test_imported_llada_defaults_to_full_our_runs_keep_without_mask(tmp_path):
    from framework.config import ConfigError
    from framework.recipe import load_run_config
    from recipes.llada.decoding import decode_config

    write_folder(llama(vocab=128), tmp_path / "llada")
    cfg, _ = load_run_config(TINY, [f"train.init_from={tmp_path / 'llada'}"], world=1)
    assert cfg.sample.confidence == "full" and decode_config(cfg.sample).confidence == "full"
    cfg, _ = load_run_config(TINY, [], world=1)
    assert cfg.sample.confidence == "without_mask" and decode_config(cfg.sample).confidence == "without_mask"
    cfg, _ = load_run_config(TINY, [f"train.init_from={tmp_path / 'llada'}", "sample.confidence=without_mask"],
                             world=1)
    assert cfg.sample.confidence == "without_mask"  # an explicit choice stays
    with pytest.raises(ConfigError, match="sample.confidence"):
        load_run_config(TINY, ["sample.confidence=softmax"], world=1)
