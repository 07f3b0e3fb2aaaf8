"""LLaDA's released checkpoint layout, in and out (framework/export/llada_io.py).

The oracle: LLaDA is a Llama block with bidirectional attention, so a random transformers `LlamaForCausalLM`
written under LLaDA's key names (the rename table below, independent of the one in llada_io) must give our
logits when it runs with a full 4-D attention mask. Then: sharded and single-file folders read alike, import ->
export -> import is bit-exact, the CLI starts a run from such a folder and `launch/export.py --format llada`
writes the same keys, shapes, shards and side files back.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from framework.checkpoint import complete_checkpoints
from framework.config import ConfigError
from framework.export import llada_io, safetensors_io
from framework.nn.llada import LladaModel, LladaModelConfig
from tests.runs import ROOT, env, train

# transformers Llama key (after model.layers.N. for blocks) -> LLaDA key (after model.transformer.blocks.N.)
LLAMA_TO_LLADA_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
                        "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
                        "post_attention_layernorm": "ff_norm", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
                        "mlp.down_proj": "ff_out"}
LLAMA_TO_LLADA_TOP = {"model.embed_tokens": "wte", "model.norm": "ln_f", "lm_head": "ff_out"}
SIDE_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 4096}',
              "generation_config.json": '{"eos_token_id": 2}', "modeling_llada.py": "# the user's modeling code\n",
              "configuration_llada.py": "# the user's config class\n"}


def llama(vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 96):
    """A random transformers Llama with its norm gains moved away from 1 (so a skipped norm would show)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model


def llada_name(llama_key: str) -> str:
    block = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", llama_key)
    if block:
        return f"model.transformer.blocks.{block.group(1)}.{LLAMA_TO_LLADA_BLOCK[block.group(2)]}.weight"
    return f"model.transformer.{LLAMA_TO_LLADA_TOP[llama_key.removesuffix('.weight')]}.weight"


def write_folder(model, out: Path, shards: int = 1, dtype=torch.float32, vocab: int | None = None,
                 mask_id: int = 126, **extra) -> dict[str, torch.Tensor]:
    """Write `model` as a LLaDA release would (shards: keys dealt round-robin to N files + an index); returns
    the LLaDA-named tensors. `vocab` < the embedding rows makes a padded embedding_size."""
    c = model.config
    out.mkdir(parents=True, exist_ok=True)
    weights = {llada_name(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    config = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": c.hidden_size,
              "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
              "mlp_hidden_size": c.intermediate_size, "mlp_ratio": 4, "vocab_size": vocab or c.vocab_size,
              "embedding_size": c.vocab_size, "rope_theta": 500000.0, "rms_norm_eps": c.rms_norm_eps,
              "mask_token_id": mask_id, "eos_token_id": 2, "weight_tying": False, "block_type": "llama",
              "include_bias": False, "layer_norm_type": "rms", "activation_type": "silu", "alibi": False,
              "rope": True, "max_sequence_length": 64, "precision": "amp_bf16",
              "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig"}, **extra}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(weights, out / "model.safetensors")
    else:
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        placement = {k: names[i % shards] for i, k in enumerate(sorted(weights))}
        for name in names:
            save_file({k: v for k, v in weights.items() if placement[k] == name}, out / name)
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                       "weight_map": placement}))
    for name, text in SIDE_FILES.items():
        (out / name).write_text(text)
    return weights


def ours_from(folder: Path) -> LladaModel:
    state, cfg = llada_io.read(folder)
    model = LladaModel(cfg).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = {p.name for p in folder.glob("model*.safetensors")}
    out = {}
    for name in files:
        with safe_open(folder / name, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_logits_match_transformers_llama_with_a_full_mask(tmp_path, kv_heads):
    ref = llama(vocab=128, kv_heads=kv_heads)
    write_folder(ref, tmp_path)
    ours = ours_from(tmp_path)
    assert ours.cfg.n_kv_heads == kv_heads and ours.cfg.mask_id == 126 and ours.cfg.rope_theta == 500000.0
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    full = torch.ones(2, 1, 24, 24, dtype=torch.bool)  # 4-D: every query attends to every key
    with torch.no_grad():
        expected, causal = ref(ids, attention_mask=full).logits, ref(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - causal).abs().max() > 1e-2  # the oracle's mask matters: LLaDA is not the causal Llama


def test_sharded_and_single_file_folders_read_alike_and_round_trip_bit_exact(tmp_path):
    ref = llama(vocab=128)
    sharded = write_folder(ref, tmp_path / "sharded", shards=3, dtype=torch.bfloat16)
    write_folder(ref, tmp_path / "single", dtype=torch.bfloat16)
    a, cfg = llada_io.read(tmp_path / "sharded")
    b, _ = llada_io.read(tmp_path / "single")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # import (bf16 -> our fp32) -> export as bf16 -> the release's files, bit for bit, with its shards and files
    ours = {k: v.float() for k, v in a.items()}
    llada_io.write({k: v.to(torch.bfloat16) for k, v in ours.items()}, cfg, tmp_path / "out", tmp_path / "sharded")
    out = folder_weights(tmp_path / "out")
    assert out.keys() == sharded.keys() and all(torch.equal(out[k], sharded[k]) for k in out)
    index = lambda d: json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]  # noqa: E731
    assert index(tmp_path / "out") == index(tmp_path / "sharded")
    for name, text in SIDE_FILES.items():
        assert (tmp_path / "out" / name).read_text() == text
    source, written = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "sharded", tmp_path / "out"))
    assert written == source  # every field kept (auto_map, precision, eos...)

    # and an fp32 export imports back bit-exactly
    llada_io.write(ours, cfg, tmp_path / "fp32", tmp_path / "single")
    again, cfg2 = llada_io.read(tmp_path / "fp32")
    assert cfg2 == cfg and all(torch.equal(again[k], ours[k]) and again[k].dtype == torch.float32 for k in ours)
    assert {p.name for p in (tmp_path / "fp32").iterdir()} == {"config.json", "model.safetensors", *SIDE_FILES}

    # without a source folder (a model trained here): one file, the release's architecture fields
    llada_io.write(ours, cfg, tmp_path / "bare")
    again, cfg3 = llada_io.read(tmp_path / "bare")
    assert cfg3 == cfg and all(torch.equal(again[k], ours[k]) for k in ours)
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"] and config["block_type"] == "llama"
    with pytest.raises(ValueError, match="overwrite its source"):
        llada_io.write(ours, cfg, tmp_path / "single", tmp_path / "single")


def test_padded_embedding_and_what_cannot_map(tmp_path):
    write_folder(llama(vocab=136), tmp_path / "padded", vocab=130)  # embedding_size 136 > vocab_size 130
    assert ours_from(tmp_path / "padded").cfg.vocab_size == 136
    write_folder(llama(vocab=128), tmp_path / "bias", include_bias=True)
    with pytest.raises(ValueError, match="include_bias=True"):
        llada_io.read(tmp_path / "bias")
    fused = tmp_path / "fused"
    write_folder(llama(vocab=128), fused)
    save_file({"model.transformer.blocks.0.att_proj.weight": torch.zeros(3, 3)}, fused / "model.safetensors")
    with pytest.raises(ValueError, match="att_proj"):
        llada_io.read(fused)
    with pytest.raises(ValueError, match="model.causal=True"):
        llada_io.llada_config(LladaModelConfig(causal=True))


def test_a_bad_folder_is_a_config_error_naming_the_key(tmp_path):
    from recipes.llada.recipe import LladaConfig, adopt_llada_shape

    write_folder(llama(vocab=128), tmp_path, layer_norm_type="default")
    cfg = LladaConfig()
    cfg.train.init_from = str(tmp_path)
    with pytest.raises(ConfigError, match="train.init_from: .*layer_norm_type='default'"):
        adopt_llada_shape(cfg)


@pytest.mark.dist
def test_cli_init_from_a_llada_folder_then_export_it_back(text_data, tmp_path):
    """A run starts from the folder (its shape from config.json, not the preset), trains 2 steps at lr 0 and
    exports `--format llada --dtype bf16`: the release's bf16 tensors, key set, shards and files come back."""
    info = json.loads((text_data / "tokenizer.json").read_text())
    ref = llama(vocab=448, dim=48, heads=4, kv_heads=2, hidden=80)  # the preset says dim 64, 2 heads, ffn 128
    source = tmp_path / "LLaDA-tiny"
    released = write_folder(ref, source, shards=2, dtype=torch.bfloat16, vocab=432, mask_id=info["mask_id"])
    run = tmp_path / "run"
    out = train(text_data, run, f"train.init_from={source}", "optim.lr=0", "train.steps=2", "ema.decay=0",
                "train.zero_stage=0", "train.global_batch=4")
    assert f"initialised from {source}" in out.stdout + out.stderr
    assert "dim 64 -> 48" in out.stdout
    trained = safetensors_io.consolidated_state_dict(complete_checkpoints(run / "checkpoints")[-1])
    assert trained["blocks.0.attn.wk.weight"].shape == (24, 48)  # 2 kv heads of 12

    export = subprocess.run([sys.executable, "launch/export.py", str(run), "--format", "llada", "--dtype", "bf16",
                             "--out", str(tmp_path / "export")], cwd=ROOT, env=env(), capture_output=True,
                            text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    back = folder_weights(tmp_path / "export")
    assert back.keys() == released.keys()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], released[k]) for k in back)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(p.name for p in source.iterdir())
    for name, text in SIDE_FILES.items():
        assert (tmp_path / "export" / name).read_text() == text
    assert json.loads((tmp_path / "export/model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((tmp_path / "export/config.json").read_text()) == json.loads((source / "config.json").read_text())


def test_8b_sft_preset_describes_8_02b_and_takes_its_shape_from_the_folder(tmp_path):
    from framework.recipe import load_run_config

    preset = str(ROOT / "recipes/llada/configs/llada_8b_sft.yaml")
    cfg, recipe = load_run_config(preset, [], world=8)
    assert recipe.describe(cfg).startswith("8.02B parameters")
    assert (cfg.train.zero_stage, cfg.train.precision, cfg.model.activation_checkpointing) == (3, "bf16", "full")
    write_folder(llama(vocab=128), tmp_path, mask_id=100)
    cfg, _ = load_run_config(preset, [f"train.init_from={tmp_path}", "data.seq_len=64"], world=8)
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_kv_heads, cfg.model.ffn_hidden, cfg.model.vocab_size,
            cfg.model.mask_id, cfg.model.max_seq_len) == (64, 2, 2, 96, 128, 100, 4096)


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    from framework.nn import llada

    calls, forward = [0], llada.Block.forward

    def counted(self, *args, **kwargs):  # counts block forwards (a recompute skips module hooks)
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(llada.Block, "forward", counted)
    grads, counts = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LladaModel(LladaModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                                            activation_checkpointing=checkpointing)).train()
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        calls[0] = 0
        model(ids).square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        counts.append(calls[0])
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert counts == [2, 4]  # each block recomputed once in backward
