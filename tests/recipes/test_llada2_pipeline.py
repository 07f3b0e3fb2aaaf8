"""A block-diffusion run through the CLI (objective.name=block_diffusion, 3 steps) -> `launch/export.py --format hf`
-> diffusers' LLaDA2Pipeline (the ecosystem's consumer of the format: it calls the model with attention_mask and
position_ids and reads .logits) gives, token for token, what our decoder (framework/diffusion/block_decode.py)
gives, for the same prompts, block length, step count and threshold, with editing off."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import framework  # noqa: F401  (registers the Auto classes)
from framework.data.sft import left_pad_prompts
from framework.diffusion.block_decode import BlockDecodeConfig, block_decode
from tests.runs import ROOT, env

pytestmark = pytest.mark.slow

PRESET = "recipes/llada/configs/tasks_tiny_bd.yaml"
SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64", "model.max_seq_len=96",
         "data.seq_len=72", "train.steps=3", "train.micro_batch=4", "train.global_batch=4", "optim.warmup_steps=1",
         "optim.lr=1e-4", "model.init_std=0.3", "log.every=1", "log.wandb=disabled", "log.progress=false", "eval.every=0",
         "eval.at_end=false", "checkpoint.every=0", "sample.batch_size=4"]
# lr 1e-4 from init_std 0.3: confident, varied predictions (a few steps at a usual lr predict EOS everywhere, and
# every row would end at its first token).
PROMPTS = ["add 482 + 97 =", "sort 5 1 9 3 :", "reverse a b c d :", "copy 7 2 9 :"]


def run(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bd")
    run("data/make_tasks.py", "--out", str(tmp / "tasks"), "--train", "200", "--val", "40")
    out = run("launch/train.py", PRESET, f"data.dir={tmp / 'tasks'}", f"run_dir={tmp / 'run'}", *SMALL)
    assert "block diffusion, sft" in out.stdout + out.stderr
    run("launch/export.py", str(tmp / "run"), "--format", "hf", "--out", str(tmp / "hf"))
    return tmp / "hf"


def test_decode_benchmark_has_the_block_diffusion_row(export, tmp_path):
    bd = export.parent / "run"  # the same run as --masked: only the rows' presence and counts are checked here
    report = tmp_path / "decode.json"
    out = run("launch/benchmark.py", "decode", "--masked", str(bd), "--block-diffusion", str(bd), "--prompts", "4",
              "--gen-length", "16", "--block-length", "16", "--batch-size", "4", "--threshold", "0.3",
              "--out", str(report))
    assert "block_diffusion" in out.stdout and "tok/fwd" in out.stdout and "ms/fwd" in out.stdout
    assert "block diffusion: blocks of 8, at most 8 forwards each" in out.stdout  # the run's block, not 16
    result = json.loads(report.read_text())
    assert set(result) == {"reference", "threshold", "threshold+prefix", "threshold+dual", "block_diffusion"}
    r = result["block_diffusion"]
    assert r["tokens"] > 0 and r["forwards"] > 0 and r["tokens_per_forward"] == r["tokens"] / r["forwards"]
    assert r["ms_per_forward"] == 1000 * r["seconds"] / r["forwards"]


def up_to_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("gen_length,block_length,steps,threshold,stop", [(24, 8, 8, 0.3, "tokenizer"),
                                                                          (20, 8, 3, 0.05, "early")])
def test_llada2_pipeline_tokens_equal_our_decoder(export, gen_length, block_length, steps, threshold, stop):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    assert model.config.block_size == 8 and tok.mask_token_id == model.config.mask_id
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    ids, mask = left_pad_prompts(prompts, tok.pad_token_id)  # ours: all four together, left-padded
    cfg = BlockDecodeConfig(gen_length=gen_length, block_size=block_length, steps=steps, threshold=threshold)
    eos = tok.eos_token_id
    if stop == "early":  # a token the model does produce early on, as EOS: rows then leave at different steps
        eos = block_decode(model.model, ids, mask, cfg, mask_id=tok.mask_token_id).tokens[0, 3].item()
    ours = block_decode(model.model, ids, mask, cfg, mask_id=tok.mask_token_id, eos_id=eos)

    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    theirs = []
    for row in prompts:  # one at a time: the pipeline's positions ignore left padding
        out = pipe(input_ids=torch.tensor([row]), gen_length=gen_length, block_length=block_length,
                   num_inference_steps=steps, threshold=threshold, editing_threshold=None, eos_token_id=eos,
                   output_type="seq", use_chat_template=False)
        theirs.append(up_to_eos(out.sequences[0].tolist(), eos))
    assert [up_to_eos(r, eos) for r in ours.tokens.tolist()] == theirs
    assert max(len(set(r)) for r in theirs) >= 4  # real answers, not one token repeated
    if stop == "early":
        assert eos in theirs[0] and len(theirs[0]) <= 4
