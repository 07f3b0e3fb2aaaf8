"""A LLaDA prompt + sample.gen_length beyond model.max_seq_len (the model's RoPE positions): `launch/sample.py` stops
with one line naming sample.gen_length, the prompt's token count and model.max_seq_len before building the model
(it used to die deep in the forward with a traceback); training refuses such evaluation prompts when it builds
its data, not at the first evaluation; held-out SFT prompts that do not fit are decoded cut and counted wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from framework.checkpoint import complete_checkpoints, read_meta
from framework.recipe import load_run_config
from recipes.llada.recipe import fit_prompts, prompt_room, will_evaluate
from tests.runs import ROOT, env, train

PROMPT = "The minister said"


def sample(run, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/sample.py", str(run), "--prompt", PROMPT, *args], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(text_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("too_long") / "run"
    train(text_data, run, "train.steps=1", "ema.decay=0")  # tests.runs.SMALL: model.max_seq_len=64
    cfg, recipe = load_run_config(read_meta(complete_checkpoints(run / "checkpoints")[-1])["config"], [], world=1)
    return run, len(recipe.tokenizer(cfg).encode_prompt(PROMPT))


def test_sample_cli_names_the_lengths_in_one_line(tiny_run):
    run, n = tiny_run
    fits = 64 - n - (64 - n) % 4  # the tiny preset decodes in blocks of sample.block_length=4
    out = sample(run, f"sample.gen_length={fits + 4}", f"sample.steps={fits + 4}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    line = out.stderr.strip()
    assert f"sample.gen_length={fits + 4}" in line and f"{n} tokens" in line and "model.max_seq_len=64" in line
    assert f"at most {64 - n}" in line
    assert "sampling" not in out.stdout  # stopped before any weights were read
    out = sample(run, f"sample.gen_length={fits}", f"sample.steps={fits}")  # the longest that fits decodes
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{PROMPT} ->" in out.stdout


def test_training_refuses_too_long_eval_prompts_before_any_step(text_data, tmp_path):
    out = train(text_data, tmp_path / "run", "train.steps=2", "eval.every=1", "eval.samples=1",
                "sample.gen_length=96", "sample.steps=96", f"sample.prompts=[{PROMPT!r}]", check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "sample.gen_length=96" in out.stderr
    assert "model.max_seq_len=64" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "loss" not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_only_a_run_that_reaches_an_eval_checks_its_prompts():
    """The README's 8B presets evaluate every 1000 steps: a 2-step tiny run of them is not refused for prompts
    outgrowing its tiny folder's positions, a run reaching eval.every or eval.at_end is."""
    preset = str(ROOT / "recipes/llada/configs/llada_8b_sft_lora.yaml")
    for overrides, evaluates in ((["train.steps=2", "eval.at_end=false"], False),
                                 (["train.steps=1000", "eval.at_end=false"], True),
                                 (["train.steps=2", "eval.at_end=true"], True),
                                 (["train.steps=5000", "eval.every=0", "eval.at_end=false"], False)):
        cfg, _ = load_run_config(preset, overrides, world=1)
        assert will_evaluate(cfg) is evaluates, overrides


def test_held_out_prompts_are_cut_to_the_room_left():
    cfg, _ = load_run_config(str(ROOT / "recipes/llada/configs/tasks_tiny_bd.yaml"),
                             ["model.max_seq_len=44", "data.seq_len=40", "sample.gen_length=24"], world=1)
    assert prompt_room(cfg) == 40 - 24  # whole blocks of objective.block_size=8
    prompts, cut = fit_prompts([[1] * 16, list(range(20))], prompt_room(cfg))
    assert prompts == [[1] * 16, list(range(4, 20))] and cut == [False, True]


def test_sft_eval_decodes_too_long_held_out_prompts_cut_and_counts_them(tmp_path):
    """gen_length 76 of max_seq_len 80 leaves 4 prompt tokens: the held-out task prompts are longer, so exact_match
    is decoded from cut prompts, scored 0, and the count is printed (it used to stop the run with a traceback)."""
    tasks = tmp_path / "tasks"
    subprocess.run([sys.executable, "data/make_tasks.py", "--out", str(tasks), "--train", "200", "--val", "20"],
                   cwd=ROOT, env=env(), check=True, capture_output=True, text=True, timeout=300)
    cmd = [sys.executable, "launch/train.py", "recipes/llada/configs/tasks_tiny.yaml", f"data.dir={tasks}",
           f"run_dir={tmp_path / 'run'}", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_hidden=64",
           "model.max_seq_len=80", "data.seq_len=72", "train.steps=1", "train.micro_batch=4", "train.global_batch=4",
           "log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.at_end=true", "eval.batches=1",
           "eval.micro_batch=4", "eval.samples=4", "checkpoint.every=0", "sample.gen_length=76", "sample.block_length=4",
           "sample.steps=19", "sample.threshold=0.5", "sample.prompts=['1']"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "4 of 4 held-out prompts are longer than model.max_seq_len=80 - sample.gen_length=76" in out.stdout
    assert [r["eval/exact_match"] for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
            if "eval/exact_match" in r] == [0.0]
