"""Shard index, deterministic shard-to-rank assignment, and safe whole-shard tar reading."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np

# webdataset's rule: the key is everything before the first dot of the file's base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")


class CorruptShardError(Exception):
    """A shard (or a sample inside it) could not be read."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"corrupt shard {path}: {reason}")
        self.path, self.reason = str(path), reason


def load_index(path: str | Path) -> dict:
    """Read DIR/index.json (or the given .json); adds "root", the folder shard paths are relative to."""
    path = Path(path)
    if path.is_dir():
        path = path / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"shard index {path} not found (build shards with the tools in data/)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"shard index {path} is not valid JSON: {e}") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"shard index {path} has no non-empty 'shards' list")
    for i, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("samples"), int)):
            raise ValueError(f"shard index {path}: shards[{i}] needs a string 'path' and an int 'samples'")
    index["root"] = str(path.parent.resolve())
    return index


def assign_shards(num_shards: int, rank: int, world: int, seed: int, epoch: int, worker: int = 0,
                  num_workers: int = 1) -> list[int]:
    """Shard ids for one (rank, worker) slot: a (seed, epoch) permutation dealt round-robin to the slots."""
    if not (0 <= rank < world and 0 <= worker < num_workers):
        raise ValueError(f"need 0 <= rank < world and 0 <= worker < num_workers, got "
                         f"rank={rank} world={world} worker={worker} num_workers={num_workers}")
    slots = world * num_workers
    if num_shards < slots:
        raise ValueError(f"{num_shards} shards cannot feed {slots} slots (world {world} x {num_workers} "
                         f"workers): write smaller shards or use fewer ranks/workers")
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return order[rank * num_workers + worker::slots].tolist()


def read_tar_samples(path: str | Path, expected_samples: int | None = None) -> list[dict[str, bytes | str]]:
    """Read a whole webdataset tar into samples {"__key__": str, ext: bytes}; raises CorruptShardError."""
    samples: list[dict[str, bytes | str]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue  # only file contents matter; links and folders are never followed
                m = _KEY_EXT.match(member.name)
                if m is None:
                    raise CorruptShardError(path, f"member {member.name!r} has no KEY.EXT name")
                key, ext = m.groups()
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                elif ext in samples[-1]:
                    raise CorruptShardError(path, f"duplicate file {member.name!r}")
                data = tar.extractfile(member)
                samples[-1][ext] = data.read() if data is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise CorruptShardError(path, f"{type(e).__name__}: {e}") from None
    if expected_samples is not None and len(samples) != expected_samples:
        # A tar cut exactly between members reads cleanly; the index count is what reveals the loss.
        raise CorruptShardError(path, f"expected {expected_samples} samples, found {len(samples)}")
    return samples


def decode_npy(data: bytes, path: str | Path = "<bytes>") -> np.ndarray:
    """Decode .npy bytes without ever unpickling; raises CorruptShardError naming path."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptShardError(path, f"bad .npy: {e}") from None


def decode_token_ids(sample: dict[str, bytes | str], ext: str, path: str | Path, vocab_size: int) -> np.ndarray:
    """A sample's EXT file as token ids: a 1-D integer array in [0, vocab_size); raises CorruptShardError
    naming path, so a stream skips the shard instead of feeding the model out-of-range ids."""
    if ext not in sample:
        raise CorruptShardError(path, f"sample {sample['__key__']!r} has no {ext}")
    ids = decode_npy(sample[ext], path)
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids.size and not 0 <= ids.min() <= ids.max() < vocab_size):
        raise CorruptShardError(path, f"sample {sample['__key__']!r}: {ext} must be a 1-D integer array in "
                                      f"[0, {vocab_size}), got {ids.dtype} {ids.shape}")
    return ids
