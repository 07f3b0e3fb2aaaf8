"""Packed token stream over text shards: equal batches on every rank, exact mid-epoch resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from framework.data.shards import CorruptShardError, assign_shards, decode_npy, load_index, read_tar_samples

FORMAT = "tokens-v1"
_CHECKED = ("world", "rank", "seed", "seq_len", "micro_batch", "num_shards")


class PackedTextStream:
    """Infinite iterator of {"input_ids", "doc_ids"}: (micro_batch, seq_len) int64, len() batches an epoch.

    Documents (each followed by EOS) are packed back to back and may span sequences; doc_ids counts
    documents from 0 within each sequence so a model can build a block-diagonal attention mask.
    """

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch: int, rank: int, world: int, seed: int,
                 batch_multiple: int = 1, max_skip_fraction: float = 0.1) -> None:
        for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("batch_multiple", batch_multiple)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.index = load_index(data_dir)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{self.index['root']}/index.json has format {self.index.get('format')!r}, "
                             f"expected {FORMAT!r} (written by data/text_to_shards.py)")
        self.root, self.shards = Path(self.index["root"]), self.index["shards"]
        if not all(isinstance(s.get("tokens"), int) for s in self.shards):
            raise ValueError(f"{self.root}/index.json: every shard needs an int 'tokens' count")
        self.eos_id, self.vocab_size = int(self.index["eos_id"]), int(self.index["vocab_size"])
        self.seq_len, self.micro_batch, self.rank, self.world, self.seed = seq_len, micro_batch, rank, world, seed
        self.max_skip_fraction = max_skip_fraction
        self.batches_per_epoch = self._count_batches(batch_multiple)
        self.stats = {"skipped_shards": 0, "refills": 0}
        self._skipped: list[str] = []  # shard paths found corrupt, never read again
        self._seen: set[str] = set()
        self._docs: tuple[int, int, list[np.ndarray]] | None = None  # (epoch, shard id, shuffled docs)
        self.start_epoch(0)

    def _count_batches(self, batch_multiple: int) -> int:
        # Every rank gets at least floor(S / world) shards in every epoch, so the smallest shards taken that
        # many times bound every rank's tokens: the same number on all ranks and epochs, no communication.
        assign_shards(len(self.shards), self.rank, self.world, self.seed, 0)  # raises if too few shards
        per_rank = len(self.shards) // self.world
        sizes = sorted(int(s["tokens"]) + int(s["samples"]) for s in self.shards)  # +1 EOS per document
        tokens = sum(sizes[:per_rank])
        batches = tokens // self.seq_len // self.micro_batch // batch_multiple * batch_multiple
        if batches == 0:
            raise ValueError(
                f"{self.root}: a rank is only sure to get {tokens} tokens ({per_rank} of {len(self.shards)} "
                f"shards, world {self.world}) but one epoch needs seq_len {self.seq_len} x micro_batch "
                f"{self.micro_batch} x batch_multiple {batch_multiple} = "
                f"{self.seq_len * self.micro_batch * batch_multiple}: use more data or smaller batches")
        return batches

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch the next batch comes from."""
        return self._epoch

    def __iter__(self) -> PackedTextStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        need = self.seq_len * self.micro_batch
        while self._buffered < need:
            self._push(self._next_document())
        if len(self._buf_tokens) > 1:  # one chunk is sliced in place: a long document is never recopied
            self._buf_tokens, self._buf_docs = [np.concatenate(self._buf_tokens)], [np.concatenate(self._buf_docs)]
        tokens, docs = self._buf_tokens[0], self._buf_docs[0]
        self._buf_tokens, self._buf_docs = [tokens[need:]], [docs[need:]]
        self._buffered -= need
        docs = docs[:need].reshape(self.micro_batch, self.seq_len)
        batch = {"input_ids": torch.from_numpy(tokens[:need].reshape(self.micro_batch, self.seq_len).copy()),
                 "doc_ids": torch.from_numpy(docs - docs[:, :1])}
        self._batches += 1
        if self._batches >= self.batches_per_epoch:
            self.start_epoch(self._epoch + 1)  # leftover tokens are dropped so epochs stay independent
        return batch

    def start_epoch(self, epoch: int) -> None:
        """Jump to the beginning of `epoch` (also used when the world size changed on resume)."""
        self._epoch, self._pass, self._shard_pos, self._doc_pos, self._batches = epoch, 0, 0, 0, 0
        self._shard_list = assign_shards(len(self.shards), self.rank, self.world, self.seed, epoch)
        self._buf_tokens: list[np.ndarray] = []
        self._buf_docs: list[np.ndarray] = []
        self._buffered, self._next_doc = 0, 0

    def _push(self, doc: np.ndarray) -> None:
        self._buf_tokens.append(np.append(doc.astype(np.int64), self.eos_id))
        self._buf_docs.append(np.full(len(doc) + 1, self._next_doc, dtype=np.int64))
        self._buffered += len(doc) + 1
        self._next_doc += 1

    def _next_document(self) -> np.ndarray:
        while True:
            if self._shard_pos >= len(self._shard_list):
                # Only a corrupt shard can make a rank run dry before len() batches: reread this epoch's list
                # so every rank still takes the same number of steps and no collective hangs.
                paths = [self.shards[i]["path"] for i in self._shard_list]
                if all(p in self._skipped for p in paths):
                    raise RuntimeError(f"rank {self.rank}: every shard of epoch {self._epoch} is corrupt: {paths}")
                self._pass, self._shard_pos, self._doc_pos = self._pass + 1, 0, 0
                self.stats["refills"] += 1
            docs = self._shard_docs(self._shard_list[self._shard_pos])
            if self._doc_pos < len(docs):
                self._doc_pos += 1
                return docs[self._doc_pos - 1]
            self._shard_pos, self._doc_pos = self._shard_pos + 1, 0

    def _shard_docs(self, shard_id: int) -> list[np.ndarray]:
        """This epoch's shuffled documents of a shard ([] if the shard is corrupt)."""
        if self._docs is not None and self._docs[:2] == (self._epoch, shard_id):
            return self._docs[2]
        entry = self.shards[shard_id]
        if entry["path"] in self._skipped:
            return []
        self._seen.add(entry["path"])
        try:
            docs = self._read_shard(self.root / entry["path"], entry["samples"])
        except CorruptShardError as e:
            self._skip(entry["path"], e)
            return []
        order = np.random.default_rng([self.seed, self._epoch, shard_id]).permutation(len(docs))
        self._docs = (self._epoch, shard_id, [docs[i] for i in order])
        return self._docs[2]

    def _read_shard(self, path: Path, samples: int) -> list[np.ndarray]:
        docs = []
        for sample in read_tar_samples(path, expected_samples=samples):
            if "tokens.npy" not in sample:
                raise CorruptShardError(path, f"sample {sample['__key__']!r} has no tokens.npy")
            ids = decode_npy(sample["tokens.npy"], path)
            if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids.size and not 0 <= ids.min() <= ids.max()
                                                                 < self.vocab_size):
                raise CorruptShardError(path, f"sample {sample['__key__']!r}: tokens must be a 1-D integer "
                                              f"array in [0, {self.vocab_size}), got {ids.dtype} {ids.shape}")
            docs.append(ids)
        return docs

    def _skip(self, path: str, err: CorruptShardError) -> None:
        self._skipped.append(path)
        self.stats["skipped_shards"] += 1
        warnings.warn(f"{err}; skipping it", RuntimeWarning, stacklevel=5)
        # Judge the fraction against at least a whole epoch's share so one early bad shard is not 100%.
        seen = max(len(self._seen), len(self._shard_list))
        if len(self._skipped) / seen > self.max_skip_fraction:
            raise RuntimeError(f"rank {self.rank}: {len(self._skipped)} of {seen} shards are corrupt, more than "
                               f"max_skip_fraction={self.max_skip_fraction}: {self._skipped}")

    def state_dict(self) -> dict:
        """Plain-Python cursor: where the next batch starts, plus the leftover buffer."""
        tokens = np.concatenate(self._buf_tokens) if self._buf_tokens else np.zeros(0, np.int64)
        docs = np.concatenate(self._buf_docs) if self._buf_docs else np.zeros(0, np.int64)
        return {"world": self.world, "rank": self.rank, "seed": self.seed, "seq_len": self.seq_len,
                "micro_batch": self.micro_batch, "num_shards": len(self.shards), "epoch": self._epoch,
                "pass": self._pass, "shard_pos": self._shard_pos, "doc_pos": self._doc_pos,
                "batches": self._batches, "next_doc": self._next_doc, "buffer": tokens.tolist(),
                "buffer_docs": docs.tolist(), "skipped": list(self._skipped), "seen": sorted(self._seen),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where state_dict() was taken; the run's shape must match."""
        for key in _CHECKED:
            mine = len(self.shards) if key == "num_shards" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"data state was saved with {key}={state.get(key)}, this stream has {mine}: "
                                 f"it cannot resume this stream (restart the epoch instead)")
        self.start_epoch(int(state["epoch"]))
        self._pass, self._shard_pos, self._doc_pos = state["pass"], state["shard_pos"], state["doc_pos"]
        self._batches, self._next_doc = state["batches"], state["next_doc"]
        self._buf_tokens = [np.asarray(state["buffer"], dtype=np.int64)]
        self._buf_docs = [np.asarray(state["buffer_docs"], dtype=np.int64)]
        self._buffered = len(state["buffer"])
        self._skipped, self._seen = list(state["skipped"]), set(state["seen"])
        self.stats = dict(state["stats"])
        self._docs = None
