"""PackedTextStream: equal steps on every rank, packing and doc ids, corrupt shards, exact resume."""

import json
import re
from itertools import islice

import pytest
import sentencepiece as spm
import torch

from framework.data.shards import assign_shards, load_index
from framework.data.text import PackedTextStream

L, B = 32, 2


def take(stream, n):
    return list(islice(stream, n))


def test_batches_shapes_and_determinism(make_shards):
    out = make_shards()
    a, b = PackedTextStream(out, L, B, 0, 1, seed=5), PackedTextStream(out, L, B, 0, 1, seed=5)
    first = take(a, 3)
    assert first[0]["input_ids"].shape == (B, L) and first[0]["input_ids"].dtype == torch.int64
    assert first[0]["doc_ids"].shape == (B, L) and first[0]["doc_ids"].dtype == torch.int64
    for x, y in zip(first, take(b, 3)):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["doc_ids"], y["doc_ids"])
    other = take(PackedTextStream(out, L, B, 0, 1, seed=6), 1)[0]
    assert not torch.equal(other["input_ids"], first[0]["input_ids"])


@pytest.mark.parametrize("world", [2, 3])
def test_equal_len_and_every_rank_yields_len_batches_per_epoch(make_shards, world):
    out = make_shards(n_docs=150, shard_tokens=400)
    sizes = [s["tokens"] for s in load_index(out)["shards"]]
    assert len(set(sizes)) > 1 and len(sizes) % world != 0  # unequal shards, uneven split
    streams = [PackedTextStream(out, L, B, r, world, seed=1, batch_multiple=2) for r in range(world)]
    n = len(streams[0])
    assert n > 0 and n % 2 == 0 and all(len(s) == n for s in streams)
    for s in streams:
        for epoch in range(2):
            for _ in range(n):
                assert s.epoch == epoch
                next(s)
        assert s.epoch == 2 and s.stats == {"skipped_shards": 0, "refills": 0}


def test_sequences_disjoint_across_ranks_and_documents_whole(make_shards, tokenizer, english_docs):
    out = make_shards(n_docs=150, shard_tokens=400)
    docs = {tuple(ids) for ids in spm.SentencePieceProcessor(model_file=str(tokenizer)).encode(english_docs(150))}
    eos, seen_docs, seqs = load_index(out)["eos_id"], [], []
    for rank in range(2):
        s = PackedTextStream(out, L, B, rank, 2, seed=2)
        flat = torch.cat([b["input_ids"].flatten() for b in take(s, len(s))]).tolist()
        seqs += [tuple(flat[i:i + L]) for i in range(0, len(flat), L)]
        # Split the rank's token stream at EOS: every complete piece is one whole document.
        pieces = " ".join(map(str, flat)).split(f" {eos} ")
        seen_docs += [tuple(map(int, p.split())) for p in pieces[1:-1]]
    assert len(seqs) == len(set(seqs))
    assert len(seen_docs) > 20 and len(seen_docs) == len(set(seen_docs)) and set(seen_docs) <= docs


def test_doc_ids_follow_eos(make_shards):
    out = make_shards()
    eos = load_index(out)["eos_id"]
    boundaries = 0
    for batch in take(PackedTextStream(out, L, B, 0, 1, seed=0), 8):
        ids, doc = batch["input_ids"], batch["doc_ids"]
        assert (doc[:, 0] == 0).all()
        step = doc[:, 1:] - doc[:, :-1]
        # The counter goes up by one exactly after each EOS, and nowhere else.
        assert torch.equal(step, (ids[:, :-1] == eos).long())
        boundaries += int(step.sum())
    assert boundaries > 5


@pytest.mark.parametrize("where", ["mid", "last", "boundary"])  # mid-epoch, before and at the epoch end
def test_resume_is_exact(make_shards, where):
    out = make_shards(n_docs=150, shard_tokens=400)
    ref = PackedTextStream(out, L, B, 1, 2, seed=4, batch_multiple=5)
    n = len(ref)
    take(ref, {"mid": n // 2 + 1, "last": n - 1, "boundary": n}[where])
    state = json.loads(json.dumps(ref.state_dict()))  # plain Python types only
    resumed = PackedTextStream(out, L, B, 1, 2, seed=4, batch_multiple=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == ref.epoch
    for x, y in zip(take(ref, n + 3), take(resumed, n + 3)):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["doc_ids"], y["doc_ids"])
    assert resumed.epoch == ref.epoch and resumed.state_dict() == ref.state_dict()


def test_resume_rejects_other_run_shape(make_shards):
    out = make_shards()
    state = PackedTextStream(out, L, B, 0, 2, seed=4).state_dict()
    for kwargs, key in [({"world": 3}, "world"), ({"seed": 5}, "seed"), ({"seq_len": 16}, "seq_len")]:
        args = {"seq_len": L, "micro_batch": B, "rank": 0, "world": 2, "seed": 4, **kwargs}
        with pytest.raises(ValueError, match=f"{key}="):
            PackedTextStream(out, **args).load_state_dict(state)


@pytest.mark.parametrize("world", [1, 2])
def test_truncated_shard_is_skipped_counted_and_steps_stay_equal(make_shards, world):
    out = make_shards(n_docs=150, shard_tokens=400)
    index = load_index(out)
    # Rank 0's first shard of epoch 0, so it is certainly read.
    bad = out / index["shards"][assign_shards(len(index["shards"]), 0, world, 0, 0)[0]]["path"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    streams = [PackedTextStream(out, L, B, r, world, seed=0, max_skip_fraction=0.5) for r in range(world)]
    with pytest.warns(RuntimeWarning, match=re.escape(str(bad))):
        for s in streams:
            for _ in range(2 * len(s)):
                next(s)
    assert [s.epoch for s in streams] == [2] * world
    assert streams[0].stats["skipped_shards"] == 1  # counted once, never reread
    if world == 1:
        # One rank holding every shard has no slack: losing one makes it run dry and reread its list.
        assert streams[0].stats["refills"] == 2


def test_too_many_corrupt_shards_raise_naming_them(make_shards):
    out = make_shards(n_docs=150, shard_tokens=400)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000003.tar"):
        (out / name).write_bytes(b"garbage")
    s = PackedTextStream(out, L, B, 0, 1, seed=0, max_skip_fraction=0.1)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"shard-00000[013]\.tar"):
        take(s, len(s))


def test_errors_name_the_problem(tmp_path, make_shards):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "index.json"))):
        PackedTextStream(tmp_path, L, B, 0, 1, seed=0)
    out = make_shards(n_docs=10, shard_tokens=10**6)
    with pytest.raises(ValueError, match="1 shards cannot feed 2 slots"):
        PackedTextStream(out, L, B, 0, 2, seed=0)
    with pytest.raises(ValueError, match=r"seq_len 4096 x micro_batch 2"):
        PackedTextStream(out, 4096, B, 0, 1, seed=0)
