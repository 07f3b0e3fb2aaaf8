"""A released autoregressive Llama / Qwen2 folder as `train.init_from` (framework/export/hf_ar_io.py).

The oracle is transformers itself: tiny random `LlamaForCausalLM` (grouped-query attention, untied head) and
`Qwen2ForCausalLM` (q/k/v biases, tied embeddings) saved with `save_pretrained` next to a tokenizer built here.
Imported through the recipe (`LladaRecipe.validate` + `initial_weights`) with `model.causal=true`, our logits are
transformers' own; then the three places a mask token can come from, what the import refuses, and the q/k/v biases
through the `--format hf` and `--format llada` writers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import framework  # noqa: F401  (registers our transformers classes)
from framework.config import ConfigError
from framework.export import hf_ar_io, hf_io, llada_io
from framework.nn.llada import LladaModel, count_parameters
from framework.recipe import load_run_config
from recipes.llada.tokenizer import ADAPTED_MARKER, LLADA_MASK_TOKEN, plan_mask, save_adapted
from tests.ar_models import ar_folder
from tests.runs import TINY

CAUSAL = ["model.causal=true", "objective.name=autoregressive", "data.seq_len=32"]


def imported(folder: Path, *overrides: str):
    """(run config, our model holding recipe.initial_weights) as `launch/train.py` would build them."""
    cfg, recipe = load_run_config(TINY, [f"train.init_from={folder}", f"run_dir={folder.parent / 'run'}",
                                         *overrides], world=1)
    model = LladaModel(cfg.model).eval()
    model.load_state_dict({k: v.float() for k, v in recipe.initial_weights(cfg, str(folder)).items()})
    return cfg, model


def check_logits(ref, ours, rows: int) -> torch.Tensor:
    ids = torch.randint(0, rows, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids)
    assert (got[..., :rows] - expected).abs().max() <= 1e-5
    return got


def test_llama_gqa_untied_logits_equal_transformers_and_the_mask_token_gets_a_new_row(tmp_path):
    ref, tok = ar_folder(tmp_path / "llama", "llama")  # embedding rows = len(tokenizer): no spare row
    rows = len(tok)
    cfg, ours = imported(tmp_path / "llama", *CAUSAL)
    m = cfg.model
    assert (m.n_kv_heads, m.qkv_bias, m.tie_embeddings, m.rope_theta, m.max_seq_len) == (2, False, False, 1e5, 64)
    assert (m.vocab_size, m.mask_id) == (rows + 1, rows)  # <|mdm_mask|> on one more row
    got = check_logits(ref, ours, rows)
    embed, head = ref.model.embed_tokens.weight, ref.lm_head.weight
    assert torch.allclose(ours.embed.weight[rows], embed.mean(0)) and torch.allclose(ours.lm_head.weight[rows],
                                                                                       head.mean(0))
    assert got.shape[-1] == rows + 1

    saved = save_adapted(tmp_path / "llama", rows, tmp_path / "run" / "tokenizer")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(saved)
    assert (again.mask_token, again.mask_token_id, len(again)) == (LLADA_MASK_TOKEN, rows, rows + 1)
    assert json.loads((saved / ADAPTED_MARKER).read_text())["base_vocab_size"] == rows


def test_qwen2_biases_tied_sharded_logits_equal_transformers_and_the_mask_takes_a_spare_row(tmp_path):
    ref, tok = ar_folder(tmp_path / "qwen", "qwen2", extra_rows=16, shard="60KB")
    assert (tmp_path / "qwen" / "model.safetensors.index.json").is_file()
    assert ref.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    cfg, ours = imported(tmp_path / "qwen", *CAUSAL)
    m = cfg.model
    assert (m.qkv_bias, m.tie_embeddings, m.rope_theta, m.norm_eps) == (True, True, 1e6, 1e-6)
    assert (m.vocab_size, m.mask_id) == (len(tok) + 16, len(tok))  # the first spare id, no resize
    check_logits(ref, ours, m.vocab_size)
    assert ours.lm_head.weight is ours.embed.weight
    assert count_parameters(m) == sum(p.numel() for p in ours.parameters())

    # Bidirectional (the masked diffusion default) is the same weights with another mask: logits differ
    cfg_bi, bi = imported(tmp_path / "qwen", "data.seq_len=32")
    assert not cfg_bi.model.causal and (cfg_bi.model.vocab_size, cfg_bi.model.mask_id) == (m.vocab_size, m.mask_id)
    ids = torch.randint(0, m.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (bi(ids) - ref(ids).logits).abs().max() > 1e-2


def test_a_tokenizer_with_its_own_mask_token_keeps_it(tmp_path):
    ref, tok = ar_folder(tmp_path / "qwen", "qwen2", mask=True)
    cfg, ours = imported(tmp_path / "qwen", *CAUSAL)
    assert (cfg.model.vocab_size, cfg.model.mask_id) == (len(tok), tok.convert_tokens_to_ids("<|mask|>"))
    check_logits(ref, ours, len(tok))
    from recipes.llada.recipe import LladaRecipe

    run_tok = LladaRecipe().tokenizer(cfg)  # RUN_DIR/tokenizer, the folder's unchanged
    assert (run_tok.mask_id, run_tok.vocab_size, Path(run_tok.source).name) == (cfg.model.mask_id, len(tok),
                                                                               "tokenizer")


def test_mask_plan_is_a_pure_function_of_the_counts():
    assert plan_mask(7, 100, 120) == plan_mask(7, 100, 120) and plan_mask(7, 100, 120).vocab_size == 120
    spare, grown = plan_mask(None, 100, 120), plan_mask(None, 100, 100)
    assert (spare.mask_id, spare.vocab_size, spare.added) == (100, 120, True)
    assert (grown.mask_id, grown.vocab_size) == (100, 101)
    with pytest.raises(ValueError, match="101 tokens but the embedding only 100 rows"):
        plan_mask(None, 101, 100)


@pytest.mark.parametrize("family, config, named", [
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_parameters.rope_type='llama3'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "use_sliding_window=True"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_what_would_change_the_maths_is_refused_naming_the_field(tmp_path, family, config, named):
    ar_folder(tmp_path / "m", family, **config)
    with pytest.raises(ConfigError, match=f"train.init_from: .*config.json: cannot import .*{named}".replace("[", r"\[")):
        load_run_config(TINY, [f"train.init_from={tmp_path / 'm'}", *CAUSAL], world=1)


def test_legacy_rope_spelling_and_the_folder_deciding_the_mask_id(tmp_path):
    ar_folder(tmp_path / "m", "llama", extra_rows=4)
    raw = json.loads((tmp_path / "m/config.json").read_text())
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}
    assert hf_ar_io.model_fields({**legacy, "rope_theta": 5e5, "rope_scaling": None})["rope_theta"] == 5e5
    with pytest.raises(ValueError, match=r"rope_scaling='linear'"):
        hf_ar_io.model_fields({**legacy, "rope_scaling": {"type": "linear", "factor": 2.0}})
    rows = raw["vocab_size"] - 4
    # The folder decides the mask id, as it decides the shape: a preset's other id (LLaDA's) is replaced, printed.
    cfg, _ = load_run_config(TINY, [f"train.init_from={tmp_path / 'm'}", "model.mask_id=3", *CAUSAL], world=1)
    assert cfg.model.mask_id == rows


def test_qkv_biases_survive_the_hf_and_llada_exports(tmp_path):
    """An adapted Qwen2 (biases, tied, mask row) written by `--format hf` loads in transformers with our logits,
    and `--format llada` records include_qkv_bias and reads back bit-exactly."""
    from transformers import AutoModelForMaskedLM

    ar_folder(tmp_path / "qwen", "qwen2", extra_rows=3)
    cfg, ours = imported(tmp_path / "qwen", "data.seq_len=32")
    state = ours.state_dict()
    hf_io.write(state, cfg.model, tmp_path / "hf")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(loaded(ids).logits, ours(ids), rtol=0, atol=0)
    assert loaded.model.blocks[0].attn.wk.bias.abs().min() > 0

    llada_io.write(state, cfg.model, tmp_path / "llada")
    assert json.loads((tmp_path / "llada/config.json").read_text())["include_qkv_bias"] is True
    back, back_cfg = llada_io.read(tmp_path / "llada")
    assert back_cfg.qkv_bias and "blocks.1.attn.wv.bias" in back
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_an_hf_export_written_before_qkv_bias_existed_still_loads(tmp_path):
    from transformers import AutoModelForMaskedLM

    from framework.nn.llada import LladaModelConfig

    cfg = LladaModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_hidden=48)
    model = LladaModel(cfg).eval()
    hf_io.write(model.state_dict(), cfg, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["qkv_bias"]  # as exports were written before the field
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.qkv_bias is False and loaded.model.blocks[0].attn.wq.bias is None
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids), rtol=0, atol=0)


def test_the_released_qwen2_5_config_maps_without_refusal():
    """Qwen2.5-0.5B-Instruct's config.json as released (transformers 4.x spelling, sliding window off)."""
    raw = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
           "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
           "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
           "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
           "use_sliding_window": False, "vocab_size": 151936}
    fields = hf_ar_io.model_fields(raw)
    assert fields == {"vocab_size": 151936, "dim": 896, "n_layers": 24, "n_heads": 14, "n_kv_heads": 2,
                      "ffn_hidden": 4864, "rope_theta": 1e6, "norm_eps": 1e-6, "qk_norm": False, "qkv_bias": True,
                      "tie_embeddings": True, "max_seq_len": 32768}
    # 494,032,768 parameters, as the model card states (0.49B), with the tied embedding counted once
    from framework.nn.llada import LladaModelConfig

    assert count_parameters(LladaModelConfig(**fields)) == 494_032_768
