"""SFT data: data/sft_to_shards.py (bad records, multi-turn template) and SFTStream (layout, equal steps,
exact resume, too-long samples, corrupt shards), left_pad_prompts and exact_match."""

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from make_tasks import make_tasks
from sft_to_shards import write_sft_shards

from framework.data.sft import SFTStream, exact_match, left_pad_prompts
from framework.data.shards import decode_npy, load_index, read_tar_samples

REPO = Path(__file__).resolve().parents[2]
L, B = 40, 4  # every task sample (at most 35 tokens with EOS) fits L = 40


def take(stream, n):
    return list(islice(stream, n))


def same(xs, ys):
    return len(xs) == len(ys) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                      for x, y in zip(xs, ys))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "tasks"
    make_tasks(out, train=400, val=20, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def uneven(tasks) -> Path:
    """The train records in 14 shards of unequal size (13 x 30 + 10), an odd split over 2 or 3 ranks."""
    out = tasks / "uneven"
    write_sft_shards([tasks / "train.jsonl"], tasks / "tokenizer.model", out, samples_per_shard=30, progress=False)
    return out


@pytest.fixture
def train_copy(tasks, tmp_path) -> Path:
    """A private copy of the train shards, for tests that damage them."""
    return Path(shutil.copytree(tasks / "train", tmp_path / "train"))


def samples(out: Path) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for shard in load_index(out)["shards"]:
        for s in read_tar_samples(out / shard["path"], shard["samples"]):
            pairs.append((decode_npy(s["prompt.npy"]).tolist(), decode_npy(s["response.npy"]).tolist()))
    return pairs


# --- data/sft_to_shards.py -------------------------------------------------------------------------------

def test_cli_reports_and_counts_bad_records(tmp_path, tokenizer):
    good = {"prompt": "The river", "response": "rose in the morning."}
    lines = [json.dumps(good),                                              # 1 good
             "{not json",                                                   # 2 invalid JSON
             json.dumps({"prompt": "only a prompt"}),                       # 3 missing response
             json.dumps({"prompt": "p", "response": "  "}),                 # 4 empty response
             json.dumps({"messages": [{"role": "bot", "content": "x"}]}),   # 5 bad role
             json.dumps({"messages": [{"role": "user", "content": "x"}]}),  # 6 no assistant turn
             "",                                                            # 7 blank: ignored
             json.dumps({"prompt": "the " * 40, "response": "long"}),       # 8 too long for --max-len 30
             json.dumps(["a list"]),                                        # 9 not an object
             json.dumps(good)]                                              # 10 good
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    run = subprocess.run([sys.executable, "data/sft_to_shards.py", "--input", str(tmp_path / "in.jsonl"),
                          "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out"), "--max-len", "30"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for n in (2, 3, 4, 5, 6, 8, 9):
        assert f"in.jsonl:{n}:" in run.stderr, (n, run.stderr)
    assert "in.jsonl:1:" not in run.stderr and "in.jsonl:10:" not in run.stderr
    assert "not valid JSON" in run.stderr and "'response'" in run.stderr and "empty response" in run.stderr
    assert "max_len 30" in run.stderr
    index = load_index(tmp_path / "out")
    assert (index["records"], index["samples"], index["bad_records"], index["too_long"]) == (9, 2, 6, 1)
    assert "2 samples in 1 shards" in run.stdout and "6 bad, 1 too long" in run.stdout
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert samples(tmp_path / "out") == [(sp.encode(good["prompt"]), sp.encode(good["response"]))] * 2
    assert (index["eos_id"], index["pad_id"], index["mask_id"]) == (2, 0, 4)
    assert index["vocab_size"] == sp.get_piece_size()
    # Nothing valid at all is an error with a message, not a traceback.
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    run = subprocess.run([sys.executable, "data/sft_to_shards.py", "--input", str(tmp_path / "bad.jsonl"),
                          "--tokenizer", str(tokenizer), "--out", str(tmp_path / "none")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "error: no valid samples" in run.stderr and "Traceback" not in run.stderr


def test_multi_turn_gives_one_sample_per_assistant_turn(tmp_path, tokenizer):
    turns = [("system", "Be brief."), ("user", "Where is the river?"), ("assistant", "In the village."),
             ("user", "And the station?"), ("assistant", "By the market.")]
    records = [{"messages": [{"role": r, "content": c} for r, c in turns]},
               {"messages": [{"role": "user", "content": "Hello there"},
                             {"role": "assistant", "content": "Good morning"}]},
               {"prompt": "Hello there", "response": "Good morning"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    problems = []
    index = write_sft_shards([tmp_path], tokenizer, tmp_path / "out", report=problems.append, progress=False)
    assert problems == [] and index["samples"] == 4 and index["records"] == 3
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    enc, eos = sp.encode, sp.eos_id()
    first = enc("Be brief.\nWhere is the river?")
    assert samples(tmp_path / "out") == [
        (first, enc("In the village.")),
        (first + enc("In the village.") + [eos] + enc("And the station?"), enc("By the market.")),
        (enc("Hello there"), enc("Good morning")),  # a two-turn chat is exactly a prompt/response record
        (enc("Hello there"), enc("Good morning")),
    ]


def test_shards_roll_over_and_bytes_are_deterministic(tmp_path, tasks):
    args = ([tasks / "train.jsonl"], tasks / "tokenizer.model")
    a = write_sft_shards(*args, tmp_path / "a", samples_per_shard=64, progress=False)
    write_sft_shards(*args, tmp_path / "b", samples_per_shard=64, progress=False)
    assert [s["samples"] for s in a["shards"]] == [64] * 6 + [16]
    for s in a["shards"]:
        assert (tmp_path / "a" / s["path"]).read_bytes() == (tmp_path / "b" / s["path"]).read_bytes()
        assert sum(c for _, c in s["lengths"]) == s["samples"]
        assert s["tokens"] == s["prompt_tokens"] + s["response_tokens"]
    pairs = samples(tmp_path / "a")
    lengths = Counter(len(p) + len(r) + 1 for p, r in pairs)
    assert lengths == sum((Counter(dict(s["lengths"])) for s in a["shards"]), Counter())
    # Rewriting with bigger shards leaves no stale shard files behind.
    write_sft_shards(*args, tmp_path / "a", samples_per_shard=10**6, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == ["shard-000000.tar"]


# --- SFTStream --------------------------------------------------------------------------------------------

def test_batch_layout_prompt_response_then_eos(tasks):
    sp = spm.SentencePieceProcessor(model_file=str(tasks / "tokenizer.model"))
    records = {(r["prompt"], r["response"]) for r in map(json.loads, (tasks / "train.jsonl").read_text().splitlines())}
    s = SFTStream(tasks / "train", L, B, 0, 1, seed=0)
    assert (s.eos_id, s.pad_id, s.mask_id) == (2, 0, 4)
    rows = 0
    for batch in take(s, 10):
        ids, plen, alen = batch["input_ids"], batch["prompt_len"], batch["answer_len"]
        assert ids.shape == (B, L) and ids.dtype == plen.dtype == alen.dtype == torch.int64
        assert plen.shape == alen.shape == (B,)
        for row, p, a in zip(ids.tolist(), plen.tolist(), alen.tolist()):
            prompt, response = row[:p], row[p:p + a - 1]
            assert s.eos_id not in prompt + response and row[p + a - 1:] == [s.eos_id] * (L - p - a + 1)
            assert (sp.decode(prompt), sp.decode(response)) in records
            rows += 1
    assert rows == 10 * B


@pytest.mark.parametrize("world", [2, 3])
def test_equal_batches_on_every_rank_disjoint_samples_and_reshuffled_epochs(uneven, world):
    index = load_index(uneven)
    streams = [SFTStream(uneven, L, B, r, world, seed=1, batch_multiple=3) for r in range(world)]
    n = len(streams[0])
    per_rank = sorted(s["samples"] for s in index["shards"])[:len(index["shards"]) // world]
    assert n == sum(per_rank) // B // 3 * 3 and all(len(s) == n for s in streams) and n > 10
    everything = Counter(tuple(p + r) for p, r in samples(uneven))
    epochs = []
    for epoch in range(2):
        rows = Counter()
        for s in streams:
            for _ in range(n):
                assert s.epoch == epoch
                rows.update(map(tuple, next(s)["input_ids"].tolist()))
        # The two ranks read different shards: together they never give a sample more often than it exists.
        unpadded = Counter()
        for row, count in rows.items():
            unpadded[tuple(row[:len(row) - next(i for i, t in enumerate(reversed(row)) if t != 2)])] += count
        assert sum(rows.values()) == world * n * B and not unpadded - everything
        epochs.append(rows)
    assert [s.epoch for s in streams] == [2] * world and epochs[0] != epochs[1]
    assert all(s.stats == {"skipped_shards": 0, "refills": 0, "too_long": 0} for s in streams)
    first = next(SFTStream(uneven, L, B, 0, world, seed=1))["input_ids"]
    assert not torch.equal(first, next(SFTStream(uneven, L, B, 0, world, seed=2))["input_ids"])


def test_one_shard_epochs_are_fresh_permutations(tasks, tmp_path):
    out = tmp_path / "one"
    write_sft_shards([tasks / "train.jsonl"], tasks / "tokenizer.model", out, samples_per_shard=10**6, progress=False)
    s = SFTStream(out, L, B, 0, 1, seed=0)
    assert len(s) == 400 // B
    stored = [tuple(p + r) for p, r in samples(out)]
    orders = []
    for _ in range(2):
        rows = [(row, p + a - 1) for b in take(s, len(s)) for row, p, a in
                zip(b["input_ids"].tolist(), b["prompt_len"].tolist(), b["answer_len"].tolist())]
        orders.append([tuple(row[:n]) for row, n in rows])
    # Every sample exactly once per epoch, in an order that is neither the stored one nor the last epoch's.
    assert Counter(orders[0]) == Counter(orders[1]) == Counter(stored)
    assert orders[0] != stored and orders[1] != stored and orders[0] != orders[1]


@pytest.mark.parametrize("where", ["mid", "last", "boundary"])  # mid-epoch, before and at the epoch end
def test_resume_is_exact(uneven, where):
    ref = SFTStream(uneven, L, B, 1, 2, seed=4, batch_multiple=2)
    n = len(ref)
    take(ref, {"mid": n // 2 + 1, "last": n - 1, "boundary": n}[where])
    state = json.loads(json.dumps(ref.state_dict()))  # plain Python types only
    resumed = SFTStream(uneven, L, B, 1, 2, seed=4, batch_multiple=2)
    resumed.load_state_dict(state)
    assert resumed.epoch == ref.epoch
    assert same(take(ref, n + 3), take(resumed, n + 3))
    assert resumed.state_dict() == ref.state_dict()


def test_resume_rejects_other_run_shape(tasks):
    state = SFTStream(tasks / "train", L, B, 0, 2, seed=4).state_dict()
    for kwargs, key in [({"world": 1}, "world"), ({"seed": 5}, "seed"), ({"seq_len": 48}, "seq_len")]:
        args = {"seq_len": L, "micro_batch": B, "rank": 0, "world": 2, "seed": 4, **kwargs}
        with pytest.raises(ValueError, match=f"{key}="):
            SFTStream(tasks / "train", **args).load_state_dict(state)


def test_too_long_samples_are_skipped_counted_never_truncated(tasks):
    pairs = samples(tasks / "train")
    short = 16
    too_long = sum(len(p) + len(r) + 1 > short for p, r in pairs)
    assert 0 < too_long < len(pairs) // 2
    with pytest.warns(RuntimeWarning, match=f"{too_long} of {len(pairs)} samples are longer than seq_len {short}"):
        s = SFTStream(tasks / "train", short, B, 0, 1, seed=0)
    assert len(s) == (len(pairs) - too_long) // B < len(SFTStream(tasks / "train", L, B, 0, 1, seed=0))
    fitting = Counter(tuple(p + r) for p, r in pairs if len(p) + len(r) + 1 <= short)
    for batch in take(s, len(s)):
        for row, p, a in zip(batch["input_ids"].tolist(), batch["prompt_len"].tolist(), batch["answer_len"].tolist()):
            assert p + a <= short and tuple(row[:p + a - 1]) in fitting
    assert s.epoch == 1 and 0 < s.stats["too_long"] <= too_long and s.stats["refills"] == 0


def test_refill_pass_after_a_corrupt_shard_keeps_only_fitting_samples(tasks, train_copy):
    # World 1 reads every shard, so losing one leaves the rank short of len() batches: it rereads its list,
    # and the refill pass goes through the same seq_len filter.
    (train_copy / load_index(train_copy)["shards"][5]["path"]).write_bytes(b"garbage")
    short = 16
    fitting = Counter(tuple(p + r) for p, r in samples(tasks / "train") if len(p) + len(r) + 1 <= short)
    with pytest.warns(RuntimeWarning, match="longer than seq_len 16"):
        s = SFTStream(train_copy, short, B, 0, 1, seed=0)
    with pytest.warns(RuntimeWarning, match=r"shard-000005\.tar"):
        batches = take(s, 2 * len(s))
    for batch in batches:
        for row, p, a in zip(batch["input_ids"].tolist(), batch["prompt_len"].tolist(), batch["answer_len"].tolist()):
            assert p + a <= short and tuple(row[:p + a - 1]) in fitting
    assert s.epoch == 2 and s.stats["skipped_shards"] == 1 and s.stats["refills"] == 2 and s.stats["too_long"] > 0


def test_index_that_overstates_fitting_samples_raises_instead_of_looping(train_copy):
    index = json.loads((train_copy / "index.json").read_text())
    for shard in index["shards"]:
        shard["lengths"] = [[1, shard["samples"]]]  # claims every sample fits any seq_len
    (train_copy / "index.json").write_text(json.dumps(index))
    s = SFTStream(train_copy, 5, B, 0, 1, seed=0)
    with pytest.raises(RuntimeError, match=r"no sample of \[.*\] fits seq_len 5, although .*index\.json says some do"):
        next(s)
    assert s.stats["refills"] == 0 and s.stats["too_long"] == 400


def test_errors_name_the_problem(tmp_path, tasks, make_shards, train_copy):
    text = make_shards()
    with pytest.raises(ValueError, match=r"'tokens-v1', expected 'sft-v1'.*data/sft_to_shards\.py or data/make_tasks"):
        SFTStream(text, L, B, 0, 1, seed=0)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "index.json"))):
        SFTStream(tmp_path, L, B, 0, 1, seed=0)
    with pytest.raises(ValueError, match="micro_batch 401 x batch_multiple 1"):
        SFTStream(tasks / "train", L, 401, 0, 1, seed=0)
    with pytest.raises(ValueError, match="16 shards cannot feed 32 slots"):
        SFTStream(tasks / "train", L, B, 0, 32, seed=0)
    index = json.loads((train_copy / "index.json").read_text())
    del index["shards"][2]["lengths"]
    (train_copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shards\[2\] needs a 'lengths' list"):
        SFTStream(train_copy, L, B, 0, 1, seed=0)


def test_left_pad_prompts_and_exact_match():
    ids, mask = left_pad_prompts([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]] and ids.dtype == torch.int64
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3] and mask.dtype == torch.bool
    ids, mask = left_pad_prompts([], pad_id=0)
    assert ids.shape == mask.shape == (0, 0)
    assert exact_match(" 1 3  5\n", "1 3 5") and exact_match("579", "579")
    assert not exact_match("1 35", "1 3 5") and not exact_match("578", "579") and not exact_match("", "0")
