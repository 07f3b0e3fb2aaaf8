"""Shard index loading, shard-to-rank assignment, safe tar reading and ShardCursor."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from framework.data.cursor import ShardCursor
from framework.data.shards import CorruptShardError, assign_shards, decode_npy, load_index, read_tar_samples

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("num_shards,world,workers", [(7, 1, 1), (7, 3, 1), (12, 2, 3), (5, 5, 1)])
def test_assign_shards_disjoint_and_covering(num_shards, world, workers):
    slots = [assign_shards(num_shards, r, world, seed=3, epoch=1, worker=w, num_workers=workers)
             for r in range(world) for w in range(workers)]
    flat = [s for slot in slots for s in slot]
    assert sorted(flat) == list(range(num_shards))
    assert max(map(len, slots)) - min(map(len, slots)) <= 1


def test_assign_shards_deterministic_and_depends_on_epoch_and_seed():
    a = [assign_shards(40, 1, 4, seed=0, epoch=e) for e in range(3)]
    assert a == [assign_shards(40, 1, 4, seed=0, epoch=e) for e in range(3)]
    assert a[0] != a[1] != a[2]
    assert assign_shards(40, 1, 4, seed=1, epoch=0) != a[0]


def test_assign_shards_too_few_shards_names_counts():
    with pytest.raises(ValueError, match=r"3 shards cannot feed 4 slots"):
        assign_shards(3, 0, 2, seed=0, epoch=0, num_workers=2)
    with pytest.raises(ValueError, match="rank=2 world=2"):
        assign_shards(8, 2, 2, seed=0, epoch=0)


def test_read_tar_samples_groups_files_by_key(make_shards):
    out = make_shards(n_docs=10, shard_tokens=10**6)
    samples = read_tar_samples(out / "shard-000000.tar", expected_samples=10)
    assert [s["__key__"] for s in samples] == [f"{i:09d}_00000" for i in range(10)]  # DOCUMENT_CHUNK
    assert all(set(s) == {"__key__", "tokens.npy"} for s in samples)
    ids = decode_npy(samples[0]["tokens.npy"])
    assert ids.dtype == np.int32 and ids.ndim == 1 and ids.size > 0


def test_read_tar_samples_truncated_and_short_shards_raise(make_shards, tmp_path):
    path = make_shards(n_docs=10, shard_tokens=10**6) / "shard-000000.tar"
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])  # mid-member: data ends early
    with pytest.raises(CorruptShardError, match="cut.tar") as err:
        read_tar_samples(cut)
    assert err.value.path == str(cut) and err.value.reason
    # Cut exactly after the first member (512-byte header + 512-byte padded data): a clean but short tar.
    with tarfile.open(path) as tar:
        first = tar.getmembers()[1].offset
    cut.write_bytes(data[:first])
    assert len(read_tar_samples(cut)) == 1
    with pytest.raises(CorruptShardError, match="expected 10 samples, found 1"):
        read_tar_samples(cut, expected_samples=10)
    cut.write_bytes(b"not a tar file at all" * 50)
    with pytest.raises(CorruptShardError):
        read_tar_samples(cut)
    with pytest.raises(CorruptShardError, match="missing.tar"):
        read_tar_samples(tmp_path / "missing.tar")


def test_decode_npy_never_unpickles():
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptShardError, match="bad .npy"):
        decode_npy(buf.getvalue(), "x.tar")
    with pytest.raises(CorruptShardError):
        decode_npy(b"\x93NUMPY garbage")


def test_no_pickle_in_data_code():
    sources = [*(REPO / "framework" / "data").glob("*.py"), *(REPO / "data").glob("*.py")]
    assert len(sources) >= 5
    for src in sources:
        text = src.read_text()
        assert not re.search(r"import pickle|allow_pickle=True|torch\.load|pickle\.load", text), src


def test_load_index_errors_name_the_file(tmp_path, make_shards):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "index.json"))):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "index.json"))):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"path": 3}]}))
    with pytest.raises(ValueError, match=r"shards\[0\]"):
        load_index(tmp_path / "index.json")
    out = make_shards(n_docs=10)
    index = load_index(out)
    assert index["root"] == str(out.resolve()) and index["format"] == "tokens-v1"


# --- ShardCursor, with a stand-in reader: items are "SHARD/i" strings ----------------------------------------

def cursor(num_shards, samples=4, rank=0, world=1, bad=(), **kwargs):
    def read(path, count):
        if path.name in bad:
            raise CorruptShardError(path, "unreadable")
        return [f"{path.name}/{i}" for i in range(count)]
    shards = [{"path": f"s{i}.tar", "samples": samples} for i in range(num_shards)]
    return ShardCursor("/data", shards, rank, world, seed=1, read_shard=read, **{"pos_key": "doc_pos", **kwargs})


def test_cursor_reads_its_shards_in_order_each_shuffled_then_rereads_them():
    for rank in range(2):
        c = cursor(5, rank=rank, world=2)
        mine = [f"s{i}.tar" for i in assign_shards(5, rank, 2, seed=1, epoch=0)]
        items = [c.next_item() for _ in range(4 * len(mine))]
        assert [x.split("/")[0] for x in items] == [p for p in mine for _ in range(4)]
        assert sorted(items) == sorted(f"{p}/{i}" for p in mine for i in range(4))
        assert items != sorted(items) and c.stats == {"skipped_shards": 0, "refills": 0}
        # Run dry: the same epoch's list again, in the same order (the refill pass).
        assert [c.next_item() for _ in range(4)] == items[:4] and c.stats["refills"] == 1
        c.start_epoch(1)
        assert [c.next_item() for _ in range(len(items))] != items and c.epoch == 1


def test_cursor_skips_a_corrupt_shard_once_and_warns_at_the_caller():
    c = cursor(4, samples=2, bad={"s2.tar"}, max_skip_fraction=0.5)
    with pytest.warns(RuntimeWarning, match=r"corrupt shard /data/s2\.tar: unreadable; skipping it") as caught:
        items = [c.next_item() for _ in range(13)]  # 6 readable items a pass: into the third pass
    assert len(caught) == 1 and caught[0].filename == __file__  # not a line inside framework/data
    assert not any(x.startswith("s2.tar") for x in items)
    assert c.stats == {"skipped_shards": 1, "refills": 2}


def test_cursor_too_many_or_all_corrupt_shards_raise():
    c = cursor(10, bad={"s1.tar", "s4.tar", "s7.tar"}, max_skip_fraction=0.1)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"2 of 10 shards are corrupt.*s[147]\.tar"):
        [c.next_item() for _ in range(40)]
    c = cursor(2, bad={"s0.tar", "s1.tar"}, max_skip_fraction=1.0)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every shard of epoch 0 is corrupt"):
        c.next_item()


def test_cursor_on_refill_runs_before_each_refill_pass_and_may_stop_it():
    calls = []
    c = cursor(2, on_refill=calls.append)
    [c.next_item() for _ in range(8)]
    assert calls == []
    c.next_item()
    assert calls == [[f"s{i}.tar" for i in assign_shards(2, 0, 1, seed=1, epoch=0)]] and c.stats["refills"] == 1

    def stop(paths):
        raise RuntimeError(f"stop before rereading {paths}")
    c = cursor(2, on_refill=stop)
    [c.next_item() for _ in range(8)]
    with pytest.raises(RuntimeError, match="stop before rereading"):
        c.next_item()
    assert c.stats["refills"] == 0


def test_cursor_state_resumes_exactly_under_the_streams_keys_and_checks_shape():
    def make(**kw):
        return cursor(6, samples=3, bad={"s3.tar"}, max_skip_fraction=1.0, pos_key="sample_pos",
                      shape={"seq_len": 8}, counters=("too_long",), **kw)
    c = make()
    with pytest.warns(RuntimeWarning):
        [c.next_item() for _ in range(17)]  # 15 readable items a pass: 2 into the refill pass
    c.stats["too_long"] += 2
    state = json.loads(json.dumps(c.state_dict()))  # plain Python types only
    assert (state["pass"], state["sample_pos"]) == (1, 2) and "doc_pos" not in state and state["seq_len"] == 8
    assert state["skipped"] == ["s3.tar"] and state["stats"] == {"skipped_shards": 1, "refills": 1, "too_long": 2}
    resumed = make()
    resumed.load_state_dict(state)
    assert [resumed.next_item() for _ in range(20)] == [c.next_item() for _ in range(20)]
    assert resumed.state_dict() == c.state_dict()
    for other, key in ((make(world=2), "world"), (cursor(6, pos_key="sample_pos", shape={"seq_len": 9}), "seq_len")):
        with pytest.raises(ValueError, match=f"saved with {key}="):
            other.load_state_dict(state)
