"""data/make_tasks.py: deterministic, correct answers, one token per digit, val disjoint from train."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from make_tasks import make_task, make_tasks

from framework.data.shards import decode_npy, load_index, read_tar_samples

REPO = Path(__file__).resolve().parents[2]
FILES = ("train.jsonl", "val.jsonl", "tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tasks.json")


@pytest.fixture(scope="module")
def cli_tasks(tmp_path_factory) -> Path:
    """The tool through its command line, as a user runs it."""
    out = tmp_path_factory.mktemp("tasks") / "cli"
    run = subprocess.run([sys.executable, "data/make_tasks.py", "--out", str(out), "--train", "400", "--val", "20",
                          "--seed", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def solve(prompt: str) -> str:
    """The answer, recomputed from the prompt text alone."""
    if m := re.fullmatch(r"add (\d+) \+ (\d+) =", prompt):
        return str(int(m[1]) + int(m[2]))
    m = re.fullmatch(r"(sort|reverse|copy) ((?:[0-9a-z] )+):", prompt)
    assert m, f"unexpected prompt {prompt!r}"
    items = m[2].split()
    return " ".join({"sort": sorted(items), "reverse": items[::-1], "copy": items}[m[1]])


def test_cli_outputs_and_answers_are_correct(cli_tasks):
    train, val = read_jsonl(cli_tasks / "train.jsonl"), read_jsonl(cli_tasks / "val.jsonl")
    assert len(train) == 400 and len(val) == 20
    assert {r["task"] for r in train} == {"add", "sort", "reverse", "copy"}
    for r in train + val:
        assert set(r) == {"task", "prompt", "response"} and r["prompt"].startswith(r["task"] + " ")
        assert r["response"] == solve(r["prompt"])
        n = len(r["prompt"].split()) - 2  # list items: between the task name and ":"
        assert r["task"] == "add" or 3 <= n <= 8
    operands = [int(x) for r in train if r["task"] == "add" for x in re.findall(r"\d+", r["prompt"])]
    assert max(operands) < 1000 and max(operands) >= 100 and min(operands) < 10  # 1 to 3 digits
    meta = json.loads((cli_tasks / "tokenizer.json").read_text())
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["unk_id"], meta["mask_id"]) == (0, 1, 2, 3, 4)
    assert meta["vocab_size"] <= 128
    assert json.loads((cli_tasks / "tasks.json").read_text())["seed"] == 3


def test_val_is_distinct_and_disjoint_from_train(cli_tasks, tmp_path):
    # A tiny task space (36 one-item and 776 two-item lists), where plain draws would certainly collide.
    make_tasks(tmp_path, tasks=["copy"], train=300, val=30, min_items=1, max_items=2, progress=False)
    for out in (cli_tasks, tmp_path):
        train = {r["prompt"] for r in read_jsonl(out / "train.jsonl")}
        val = [r["prompt"] for r in read_jsonl(out / "val.jsonl")]
        assert len(set(val)) == len(val) and not set(val) & train


def test_every_digit_is_one_token(cli_tasks):
    sp = spm.SentencePieceProcessor(model_file=str(cli_tasks / "tokenizer.model"))
    for d in "0123456789":
        assert [p for p in sp.encode(d, out_type=str) if p != "▁"] == [d]
    for r in read_jsonl(cli_tasks / "train.jsonl")[:100]:
        for text in (r["prompt"], r["response"]):
            pieces = sp.encode(text, out_type=str)
            assert sp.unk_id() not in sp.encode(text) and sp.decode(sp.encode(text)) == text
            digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
            assert all(len(p.lstrip("▁")) == 1 for p in digit_pieces), pieces
            assert len(digit_pieces) == sum(c.isdigit() for c in text)


def test_shards_hold_the_records(cli_tasks):
    sp = spm.SentencePieceProcessor(model_file=str(cli_tasks / "tokenizer.model"))
    for split, n in (("train", 400), ("val", 20)):
        index = load_index(cli_tasks / split)
        assert index["format"] == "sft-v1" and index["samples"] == n and index["bad_records"] == 0
        assert len(index["shards"]) >= 8  # so 2 ranks each get several
        pairs = []
        for shard in index["shards"]:
            for s in read_tar_samples(cli_tasks / split / shard["path"], shard["samples"]):
                prompt, response = decode_npy(s["prompt.npy"]), decode_npy(s["response.npy"])
                assert prompt.dtype == np.int32 and sp.eos_id() not in response.tolist()
                pairs.append((sp.decode(prompt.tolist()), sp.decode(response.tolist())))
        assert pairs == [(r["prompt"], r["response"]) for r in read_jsonl(cli_tasks / f"{split}.jsonl")]


def test_deterministic_from_the_seed(tmp_path, cli_tasks):
    make_tasks(tmp_path / "same", train=400, val=20, seed=3, progress=False)
    make_tasks(tmp_path / "other", train=400, val=20, seed=4, progress=False)
    for name in FILES:
        assert (tmp_path / "same" / name).read_bytes() == (cli_tasks / name).read_bytes(), name
    for split in ("train", "val"):
        for tar in sorted((cli_tasks / split).glob("*.tar")):
            assert (tmp_path / "same" / split / tar.name).read_bytes() == tar.read_bytes()
        ours, theirs = load_index(tmp_path / "same" / split), load_index(cli_tasks / split)
        assert ours["shards"] == theirs["shards"]  # the tokenizer path and root differ, nothing else
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (cli_tasks / "train.jsonl").read_bytes()
    assert (tmp_path / "other" / "val.jsonl").read_bytes() != (cli_tasks / "val.jsonl").read_bytes()


def test_task_subset_and_options(tmp_path):
    make_tasks(tmp_path, tasks=["add"], train=300, val=10, max_digits=5, progress=False)
    records = read_jsonl(tmp_path / "train.jsonl")
    assert {r["task"] for r in records} == {"add"} and all(r["response"] == solve(r["prompt"]) for r in records)
    assert max(len(x) for r in records for x in re.findall(r"\d+", r["prompt"])) == 5
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = make_task("reverse", rng, min_items=2, max_items=2)
        assert len(r["response"].split()) == 2 and r["response"] == solve(r["prompt"])


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown mul; expected"):
        make_tasks(tmp_path, tasks=["add", "mul"], progress=False)
    with pytest.raises(ValueError, match="min_items <= max_items"):
        make_tasks(tmp_path, min_items=5, max_items=3, progress=False)
    # 36 one-item copy prompts cannot give 20 val prompts unseen in 100 train records.
    with pytest.raises(ValueError, match="task space is too small"):
        make_tasks(tmp_path, tasks=["copy"], train=100, val=20, min_items=1, max_items=1, progress=False)
    run = subprocess.run([sys.executable, "data/make_tasks.py", "--out", str(tmp_path), "--tasks", "mul"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "error: --tasks 'mul'" in run.stderr and "Traceback" not in run.stderr


def test_fixed_width_addition_pads_operands_and_sum(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(200):
        r = make_task("add", rng, max_digits=3, fixed_width=True)
        a, b = re.fullmatch(r"add (\d{3}) \+ (\d{3}) =", r["prompt"]).groups()
        assert re.fullmatch(r"\d{4}", r["response"]) and int(r["response"]) == int(a) + int(b)
    out = subprocess.run([sys.executable, "data/make_tasks.py", "--out", str(tmp_path / "t"), "--train", "300",
                          "--val", "20", "--min-items", "5", "--max-items", "5", "--fixed-width"],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "t" / "train.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "t" / "tasks.json").read_text())["fixed_width"] is True
    for r in records:
        if r["task"] == "add":
            assert len(r["response"]) == 4
        else:
            assert len(r["response"].split()) == 5
