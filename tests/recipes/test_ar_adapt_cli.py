"""Adapting a released autoregressive model to masked diffusion through the CLI: `train.init_from` = a tiny Qwen2
folder (q/k/v biases, tied embeddings, spare embedding rows, GQA) built by transformers, SFT shards written with that folder's tokenizer, masked-diffusion steps on 2 ranks (full weights
under ZeRO-2 with an exact resume; LoRA under ZeRO-3), and the exports (`--format hf`, `--format llada`, `--format peft`, `--merge`) loading
in transformers / peft with our logits."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from sft_to_shards import write_sft_shards

from framework.checkpoint import complete_checkpoints, read_meta
from framework.export import hf_ar_io
from framework.export.safetensors_io import consolidated_state_dict
from framework.nn.llada import LladaModel
from framework.recipe import load_run_config
from recipes.llada.tokenizer import LLADA_MASK_TOKEN
from tests.ar_models import ar_folder
from tests.runs import ROOT, losses, train

pytestmark = pytest.mark.dist

PAIRS = [("add 4 + 5 =", "9"), ("sort 3 1 2 :", "1 2 3"), ("reverse a b c :", "c b a"), ("copy 7 2 :", "7 2"),
         ("add 12 + 30 =", "42"), ("sort 9 8 :", "8 9"), ("reverse the river :", "river the"), ("copy 5 :", "5")]
SFT = ["data.kind=sft", "data.seq_len=64", "eval.every=0", "eval.at_end=false", "ema.decay=0"]


def export_cli():
    """launch/export.py as a module (its `_bootstrap` import needs launch/ on the path)."""
    sys.path.insert(0, str(ROOT / "launch"))
    spec = importlib.util.spec_from_file_location("launch_export", ROOT / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sft_data(folder, out):
    """train/ and val/ SFT shards written with the folder's own tokenizer (no mask token yet)."""
    for split, records in (("train", PAIRS * 8), ("val", PAIRS)):
        jsonl = out / f"{split}.jsonl"
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in records))
        write_sft_shards([jsonl], folder, out / split, samples_per_shard=16, progress=False)
    return out


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_adapt")
    ref, tok = ar_folder(root / "Qwen2-tiny", "qwen2", extra_rows=16)
    return root / "Qwen2-tiny", sft_data(root / "Qwen2-tiny", root / "data"), tok


def run_model(run):
    """(our model with the run's newest weights, its config) as launch/sample.py would rebuild it."""
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    cfg, _ = load_run_config(read_meta(ckpt)["config"], [], world=2)
    model = LladaModel(cfg.model).eval()
    model.load_state_dict(consolidated_state_dict(ckpt))
    return model, cfg, ckpt


def test_qwen2_zero2_resumes_exactly_and_exports_load_with_our_logits(qwen, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder, data, tok = qwen
    common = [*SFT, f"train.init_from={folder}", "train.zero_stage=2", "train.steps=4", "checkpoint.every=2",
              "optim.lr=3e-3"]
    straight = tmp_path / "straight"
    out = train(data, straight, *common, nproc=2)
    assert f"{LLADA_MASK_TOKEN} added at id {len(tok)}: a spare embedding row" in out.stdout
    assert "qkv_bias False -> True" in out.stdout and "tie_embeddings False -> True" in out.stdout
    first = losses(straight)
    model, cfg, ckpt = run_model(straight)
    # Resuming from step 2 (an explicit older checkpoint: step 4 moves to abandoned/) replays steps 3-4 exactly;
    # one launch fewer than stop + resume, and the resumed run reads RUN_DIR/tokenizer as it stands.
    train(data, straight, *common, f"resume={complete_checkpoints(straight / 'checkpoints')[0]}", nproc=2)
    again = losses(straight)
    assert [first[s] for s in range(1, 5)] == [again[s] for s in range(1, 5)]
    resumed = consolidated_state_dict(complete_checkpoints(straight / "checkpoints")[-1])
    assert all(torch.equal(v, resumed[k]) for k, v in model.state_dict().items())
    assert (cfg.model.mask_id, cfg.model.vocab_size, cfg.model.qkv_bias) == (len(tok), len(tok) + 16, True)
    assert AutoTokenizer.from_pretrained(straight / "tokenizer").mask_token_id == len(tok)  # saved with the run

    export = export_cli()
    assert export.main([str(straight), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert export.main([str(straight), "--format", "llada", "--out", str(tmp_path / "llada")]) == 0
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        torch.testing.assert_close(theirs, model(ids), rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").mask_token == LLADA_MASK_TOKEN
    llada = json.loads((tmp_path / "llada/config.json").read_text())
    assert (llada["include_qkv_bias"], llada["mask_token_id"], llada["weight_tying"]) == (True, len(tok), True)
    assert AutoTokenizer.from_pretrained(tmp_path / "llada").mask_token_id == len(tok)


def test_qwen2_lora_under_zero3_keeps_the_imported_base_and_peft_and_merged_exports_give_our_logits(qwen, tmp_path):
    """Under ZeRO-3 rank 0 alone reads the folder; the frozen base stays the import exactly (tied embedding, biases,
    the mask token's spare row), adapters (on biased q/k/v too) move, and peft / --merge exports compute our model."""
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    from framework import lora

    folder, data, _ = qwen
    run = tmp_path / "lora"
    train(data, run, *SFT, f"train.init_from={folder}", "train.zero_stage=3", "train.steps=2", "optim.lr=1e-2",
          "lora.rank=4", "lora.alpha=8", "lora.targets=[wq,wk,wv,ffn.w2]", nproc=2)
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    cfg, _ = load_run_config(read_meta(ckpt)["config"], [], world=2)
    trained = consolidated_state_dict(ckpt)
    base, adapters = lora.split_state(trained)
    imported, _ = hf_ar_io.read(folder)
    assert base.keys() == imported.keys() and all(torch.equal(base[k], imported[k]) for k in base)
    assert len(adapters) == 8 and all(b.abs().max() > 0 for _, b in adapters.values())
    ours = LladaModel(cfg.model)
    lora.apply(ours, cfg)
    ours.load_state_dict(trained)
    export = export_cli()
    for fmt, flags, name in (("hf", [], "hf"), ("peft", [], "peft"), ("hf", ["--merge"], "merged")):
        assert export.main([str(run), "--format", fmt, "--out", str(tmp_path / name), *flags]) == 0, name
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.eval()(ids)
        base_model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
        plain = base_model(ids).logits
        adapted = PeftModel.from_pretrained(base_model, tmp_path / "peft").eval()(ids).logits
        merged = AutoModelForMaskedLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapters moved
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset, extra", [("llada_8b_sft_lora.yaml", []),
                                           ("llada_8b_sft.yaml", ["objective.shift=true", "objective.anneal_steps=4"])])
def test_the_readmes_released_model_commands_run_tiny(qwen, tmp_path, preset, extra):
    """README "Fine-tune a released model": the 8B presets themselves, with only the folder, data and a CPU-sized
    batch changed; the model's shape and mask id come from the (tiny) folder, as they would from the released one."""
    import subprocess

    from tests.runs import env

    folder, data, tok = qwen
    run = tmp_path / "run"
    args = [str(ROOT / "recipes/llada/configs" / preset), f"train.init_from={folder}", f"data.dir={data}",
            f"run_dir={run}", "data.seq_len=64", "train.steps=2", "train.global_batch=2", "train.micro_batch=2",
            "eval.at_end=false", "checkpoint.every=0", "log.every=1", *extra]
    out = subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"mask_id 126336 -> {len(tok)}" in out.stdout  # the preset's LLaDA id replaced by the folder's
    assert sorted(losses(run)) == [1, 2] and all(v == v for v in losses(run).values())
