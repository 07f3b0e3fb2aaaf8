"""launch/bench_decode.py decodes a run adapted with objective.shift (Dream-style: the output at position i
predicts token i + 1) the way the recipe does: the same tokens as recipes.llada.decoding.generate_answers, which
launch/sample.py and in-training evaluation use. Before the fix the benchmark ignored the shift and read every
token one column off."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch

from framework.data.sft import left_pad_prompts
from framework.diffusion.masked_decode import decode
from recipes.llada.decoding import decode_config, generate_answers
from tests.runs import ROOT, env

pytestmark = pytest.mark.slow

# A barely trained model (2 steps at a tiny lr): a longer run on these tasks answers EOS everywhere, which reads
# the same shifted or not and would make the comparison blind.
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64", "model.max_seq_len=96",
        "data.seq_len=72", "train.steps=2", "train.micro_batch=4", "train.global_batch=8", "optim.warmup_steps=2",
        "optim.lr=1e-6", "log.every=1", "log.wandb=disabled", "log.progress=false", "eval.every=0",
        "eval.at_end=false", "checkpoint.every=0", "sample.gen_length=32", "sample.block_length=16",
        "sample.steps=32", "sample.threshold=0", "sample.cache=none", "sample.batch_size=8", "objective.shift=true"]


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "launch" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_shift")
    tasks, run = root / "tasks", root / "run"
    subprocess.run([sys.executable, "data/make_tasks.py", "--out", str(tasks), "--train", "200", "--val", "16"],
                   cwd=ROOT, env=env(), check=True, capture_output=True, text=True, timeout=300)
    out = subprocess.run([sys.executable, "launch/train.py", "recipes/llada/configs/tasks_tiny.yaml",
                          f"data.dir={tasks}", f"run_dir={run}", *TINY], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return tasks, run


def test_bench_decode_reads_a_shifted_run_as_the_recipe_does(shifted_run):
    tasks, run = shifted_run
    bench = bench_module()
    model, cfg = bench.load_trained(str(run), torch.device("cpu"))
    assert cfg.objective.shift
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--masked", str(run), "--gen-length", "32", "--block-length", "16"])
    names = bench.variants(args, cfg)
    assert all(names[n].shift for n in ("reference", "threshold", "threshold+prefix", "threshold+dual"))

    sp = spm.SentencePieceProcessor(model_file=str(tasks / "tokenizer.model"))
    prompts, _ = bench.task_prompts(str(tasks), 8)
    prompts_ids, eos_id, pad_id = [sp.encode(p) for p in prompts], sp.eos_id(), max(sp.pad_id(), 0)
    ids, mask = left_pad_prompts(prompts_ids, pad_id)

    def bench_tokens(dcfg, eos=None):
        return bench.decode_with(dcfg, {"masked": model}, ids, mask, gen_length=32, mask_id=cfg.model.mask_id,
                                 eos_id=eos).tokens

    with torch.no_grad():
        answers, _ = generate_answers(model, cfg, prompts_ids, eos_id=eos_id, pad_id=pad_id,
                                      device=torch.device("cpu"))
        ours = bench_tokens(names["reference"], eos_id).tolist()
        assert [row[: row.index(eos_id)] if eos_id in row else row for row in ours] == answers
        # Whole rows (no stop at EOS), so every position counts: the recipe's decoder settings for this run.
        recipe = decode(model, ids, mask, decode_config(cfg.sample, shift=cfg.objective.shift),
                        mask_id=cfg.model.mask_id).tokens
        assert torch.equal(bench_tokens(names["reference"]), recipe)
        # The check has teeth: read unshifted (the old benchmark), the same model gives other tokens.
        assert not torch.equal(bench_tokens(bench.variants(args, None)["reference"]), recipe)
