"""The text data tools: document reading, tokenizer training, shard writing, the one-command pipeline."""

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from build_tokenizer import train_tokenizer
from documents import iter_documents
from prepare_text import split_holdout
from text_to_shards import write_shards

from framework.data.shards import decode_npy, read_tar_samples

REPO = Path(__file__).resolve().parents[2]


def test_iter_documents_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("first document\nstill the first\n")
    (tmp_path / "sub" / "b.jsonl").write_text('{"body": "second"}\n\n{"body": "third"}\n')
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("fourth")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\0")
    docs = list(iter_documents([tmp_path], text_key="body"))
    assert docs == ["first document\nstill the first\n", "second", "third", "fourth"]
    (tmp_path / "bad.jsonl").write_text('{"body": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(iter_documents([tmp_path / "bad.jsonl"], text_key="body"))
    with pytest.raises(ValueError, match="'text'"):
        list(iter_documents([tmp_path / "sub" / "b.jsonl"]))
    with pytest.raises(FileNotFoundError, match="nope"):
        list(iter_documents([tmp_path / "nope"]))


def test_train_tokenizer_special_ids_and_round_trip(tmp_path, english_docs):
    meta = train_tokenizer(english_docs(100), tmp_path / "tok", vocab_size=350, model_type="bpe")
    assert meta == json.loads((tmp_path / "tok.json").read_text())
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["unk_id"], meta["mask_id"]) == (0, 1, 2, 3, 4)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert sp.id_to_piece(4) == "<mask>" and meta["vocab_size"] == sp.get_piece_size()
    text = "The river station said:\n  £3,000 and ünïcode"  # unseen characters go through byte fallback
    assert sp.decode(sp.encode(text)) == text and sp.unk_id() not in sp.encode(text)
    assert len((tmp_path / "tok.vocab").read_text().splitlines()) == meta["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size=50"):
        train_tokenizer(english_docs(20), tmp_path / "small", vocab_size=50)


def test_write_shards_counts_rollover_and_deterministic_bytes(tmp_path, tokenizer, english_docs):
    docs = english_docs(60) + ["   "]  # a blank document is dropped
    index = write_shards(docs, tokenizer, tmp_path / "a", shard_tokens=300, progress=False)
    write_shards(docs, tokenizer, tmp_path / "b", shard_tokens=300, progress=False)
    assert json.loads((tmp_path / "a" / "index.json").read_text()) == index
    assert index["format"] == "tokens-v1" and index["tokenizer"] == str(tokenizer.resolve())
    assert index["eos_id"] == 2 and index["vocab_size"] == spm.SentencePieceProcessor(str(tokenizer)).vocab_size()
    assert len(index["shards"]) > 3 and sum(s["samples"] for s in index["shards"]) == 60
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    decoded = []
    for shard in index["shards"]:
        path = tmp_path / "a" / shard["path"]
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(
            (tmp_path / "b" / shard["path"]).read_bytes()).digest()
        with tarfile.open(path) as tar:
            assert all("." not in m.name.split(".", 1)[0] for m in tar)
        samples = read_tar_samples(path, shard["samples"])
        ids = [decode_npy(s["tokens.npy"]) for s in samples]
        assert all(a.dtype == np.int32 for a in ids) and sum(map(len, ids)) == shard["tokens"]
        assert shard is index["shards"][-1] or shard["tokens"] >= 300
        decoded += [sp.decode(a.tolist()) for a in ids]
    assert decoded == english_docs(60)  # no BOS/EOS added, order kept
    # Rewriting with bigger shards leaves no stale shard files behind.
    index = write_shards(docs, tokenizer, tmp_path / "a", shard_tokens=10**6, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == ["shard-000000.tar"]


def test_split_holdout_is_deterministic_and_about_five_percent():
    docs = [f"d{i}" for i in range(200)]
    train, val = split_holdout(docs)
    assert len(val) == 10 and len(train) == 190 and set(train).isdisjoint(val)
    assert split_holdout(docs) == (train, val)
    assert len(split_holdout(docs[:3])[1]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout(docs[:1])


def test_prepare_text_end_to_end_and_idempotent(tmp_path, english_docs):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in english_docs(80, seed=9)))
    for i, d in enumerate(english_docs(5, seed=10)):
        (corpus / f"extra{i}.txt").write_text(d)
    cmd = [sys.executable, str(REPO / "data" / "prepare_text.py"), "--input", str(corpus), "--out",
           str(tmp_path / "out"), "--vocab-size", "400", "--shard-tokens", "500"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "81 train and 4 val documents" in run.stdout and str(tmp_path / "out" / "tokenizer.model") in run.stdout
    train = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    val = json.loads((tmp_path / "out" / "val" / "index.json").read_text())
    assert sum(s["samples"] for s in train["shards"]) == 81 and sum(s["samples"] for s in val["shards"]) == 4
    assert len(train["shards"]) > 2 and train["tokenizer"] == str((tmp_path / "out" / "tokenizer.model").resolve())
    before = Path(tmp_path / "out" / "train" / "shard-000000.tar").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "all outputs exist" in again.stdout
    assert Path(tmp_path / "out" / "train" / "shard-000000.tar").stat().st_mtime_ns == before


@pytest.mark.network
def test_fetch_default_corpus(tmp_path):
    from fetch_default_corpus import fetch_default_corpus

    try:
        paths = fetch_default_corpus(tmp_path)
    except RuntimeError as e:  # no PyPI here: the error must say what failed and how to retry
        assert "gensim==4.4.0" in str(e) and "pip download" in str(e)
        pytest.skip(f"PyPI unreachable: {e}")
    train = list(iter_documents([paths["train"]]))
    assert len(train) == 300 and train[0].startswith("Hundreds of people have been forced")
    assert len(list(iter_documents([paths["val"]]))) == 50
