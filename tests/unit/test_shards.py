"""Shard index loading, shard-to-rank assignment and safe tar reading."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

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
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(10)]
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
