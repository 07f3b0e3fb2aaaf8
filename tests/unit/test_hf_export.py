"""Hugging Face export: transformers' Auto classes load our folder (no trust_remote_code) and give our logits;
the converted tokenizer gives sentencepiece's ids; `import framework` registers in either import order
without importing transformers itself."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch

import framework  # noqa: F401  (registers the Auto classes)
from framework.export import hf_io
from framework.nn.llada import LladaModel, LladaModelConfig
from tests.runs import ROOT, env

TINY = LladaModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=24, qk_norm=True)
TEXTS = ["The minister said", "  two  spaces\nnew line\n\n x", "Ünïcödé ﬁ café 😀 日本語", "a <mask> b<mask>c", "",
         " leading", "trailing ", "tab\there", "<mask> first", "said<mask><mask> in Sydney, police", "▁already"]


def _model(cfg: LladaModelConfig) -> LladaModel:
    torch.manual_seed(0)
    model = LladaModel(cfg).eval()
    with torch.no_grad():  # norm gains away from 1, so a norm initialised by transformers would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("causal,tie", [(False, False), (True, False), (False, True)])
def test_auto_classes_load_the_export_with_our_logits(tmp_path, causal, tie):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    cfg = dataclasses.replace(TINY, causal=causal, tie_embeddings=tie)
    ours = _model(cfg)
    hf_io.write(ours.state_dict(), cfg, tmp_path, source={"recipe": "llada", "step": 7, "ema": False})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LladaForCausalLM" if causal else "LladaForMaskedLM"]
    assert config["framework_source"]["step"] == 7 and config["model_type"] == "framework_llada"

    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False  # a padded row: HF's attention_mask is our key_padding_mask
    with torch.no_grad():
        logits, padded = ours(ids), ours(ids, key_padding_mask=mask)
        hidden, _ = ours.hidden_states(ids)
        for auto in (AutoModelForMaskedLM, AutoModelForCausalLM):
            hf = auto.from_pretrained(tmp_path).eval()
            assert hf.model.rope_cos.dtype == torch.float32  # rebuilt, not left as from_pretrained's empty memory
            torch.testing.assert_close(hf(ids).logits, logits, rtol=0, atol=0)
            torch.testing.assert_close(hf(ids, attention_mask=mask.long()).logits, padded, rtol=0, atol=0)
            assert (hf.model.lm_head.weight is hf.model.embed.weight) is tie
        base = AutoModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(base(ids).last_hidden_state, hidden, rtol=0, atol=0)
    assert AutoConfig.from_pretrained(tmp_path).model_config() == cfg

    state, read_cfg = hf_io.read(tmp_path)  # back into our model: same keys, same config
    assert read_cfg == cfg and state.keys() == ours.state_dict().keys()


def test_a_folder_saved_by_transformers_reads_back(tmp_path):
    from transformers import AutoModelForMaskedLM

    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    ours = _model(cfg)
    hf_io.write(ours.state_dict(), cfg, tmp_path / "a")
    AutoModelForMaskedLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")  # e.g. after fine-tuning
    state, read_cfg = hf_io.read(tmp_path / "b")
    fresh = LladaModel(read_cfg).eval()
    fresh.load_state_dict(state)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), ours(ids), rtol=0, atol=0)


def test_causal_twin_generates_like_our_greedy_loop(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = dataclasses.replace(TINY, causal=True)
    ours = _model(cfg)
    hf_io.write(ours.state_dict(), cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    ids[1, :2] = 0  # left padding
    attention = (torch.arange(6) >= torch.tensor([[0], [2]])).long()
    out = hf.generate(ids, attention_mask=attention, max_new_tokens=8, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        for row, start in ((0, 0), (1, 2)):
            seq = ids[row:row + 1, start:]
            for _ in range(8):
                seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert torch.equal(out[row, start:], seq[0])


def test_config_mirrors_the_model_config():
    from framework.export.hf_llada import LladaHFConfig

    hf = LladaHFConfig()
    for f in dataclasses.fields(LladaModelConfig):
        assert getattr(hf, f.name) == f.default, f.name  # same names and defaults
    assert (hf.hidden_size, hf.num_hidden_layers, hf.tie_word_embeddings) == (hf.dim, hf.n_layers, hf.tie_embeddings)
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(StrictDataclassClassValidationError, match="divisible"):  # LladaModelConfig's own check
        LladaHFConfig(dim=30, n_heads=4)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_tokenizer_gives_sentencepiece_ids(tmp_path, tokenizer, english_docs, model_type):
    from build_tokenizer import train_tokenizer
    from transformers import AutoTokenizer

    model_file = tokenizer
    if model_type == "bpe":
        train_tokenizer(english_docs(200, seed=123), tmp_path / "bpe", vocab_size=400, model_type="bpe")
        model_file = tmp_path / "bpe.model"
    hf_io.write(_model(TINY).state_dict(), TINY, tmp_path / "hf", tokenizer_model=model_file)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for text in TEXTS + english_docs(20, seed=3):
        ids = sp.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == sp.decode(ids), text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    batch = tok(["The minister", "a"], padding=True, return_tensors="pt")
    assert batch.input_ids[1, -1] == 0 and batch.attention_mask[1, -1] == 0


REGISTERED = "from transformers import AutoConfig; print(AutoConfig.for_model('framework_llada').model_type)"


@pytest.mark.parametrize("first", ["framework", "transformers"])
def test_registration_in_either_import_order(first):
    imports = "import framework; import transformers" if first == "framework" else \
        "import transformers; import framework"
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", f"{imports}; {REGISTERED}"], cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "framework_llada"


def test_import_framework_does_not_import_transformers():
    code = "import sys, framework, framework.trainer; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-3000:]


def test_a_failed_registration_warns_and_leaves_transformers_usable():
    # framework.nn.llada made unimportable: registering fails, importing and using transformers must not.
    code = ("import sys, warnings, framework; sys.modules['framework.nn.llada'] = None\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import transformers\n"
            "print(transformers.AutoConfig.for_model('llama').model_type)\n"
            "print([str(w.message) for w in caught if 'framework: could not register' in str(w.message)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "llama" and "framework.nn.llada" in lines[1], out.stdout
