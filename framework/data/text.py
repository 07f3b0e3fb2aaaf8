"""Packed token stream over text shards: equal batches on every rank, exact mid-epoch resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from framework.data.cursor import ShardStream
from framework.data.shards import decode_token_ids, read_tar_samples

FORMAT = "tokens-v1"


class PackedTextStream(ShardStream):
    """Infinite iterator of {"input_ids", "doc_ids"}: (micro_batch, seq_len) int64, len() batches an epoch.

    Documents (each followed by EOS) are packed back to back and may span sequences; doc_ids counts
    documents from 0 within each sequence so a model can build a block-diagonal attention mask.
    """

    FORMAT = FORMAT
    FORMAT_HINT = " (written by data/text_to_shards.py)"
    POS_KEY = "doc_pos"

    def _check_index(self) -> None:
        if not all(isinstance(s.get("tokens"), int) for s in self.shards):
            raise ValueError(f"{self.root}/index.json: every shard needs an int 'tokens' count")

    def _shard_units(self) -> tuple[list[int], str]:
        return [int(s["tokens"]) + int(s["samples"]) for s in self.shards], "tokens"  # +1 EOS per document

    def _batch_units(self) -> tuple[int, str]:
        return self.seq_len * self.micro_batch, f"seq_len {self.seq_len} x micro_batch {self.micro_batch}"

    def _batch(self) -> dict[str, torch.Tensor]:
        need = self.seq_len * self.micro_batch
        while self._buffered < need:
            self._push(self._cursor.next_item())
        if len(self._buf_tokens) > 1:  # one chunk is sliced in place: a long document is never recopied
            self._buf_tokens, self._buf_docs = [np.concatenate(self._buf_tokens)], [np.concatenate(self._buf_docs)]
        tokens, docs = self._buf_tokens[0], self._buf_docs[0]
        self._buf_tokens, self._buf_docs = [tokens[need:]], [docs[need:]]
        self._buffered -= need
        docs = docs[:need].reshape(self.micro_batch, self.seq_len)
        return {"input_ids": torch.from_numpy(tokens[:need].reshape(self.micro_batch, self.seq_len).copy()),
                "doc_ids": torch.from_numpy(docs - docs[:, :1])}

    def _reset(self) -> None:
        self._buf_tokens: list[np.ndarray] = []
        self._buf_docs: list[np.ndarray] = []
        self._buffered, self._next_doc = 0, 0

    def _push(self, doc: np.ndarray) -> None:
        self._buf_tokens.append(np.append(doc.astype(np.int64), self.eos_id))
        self._buf_docs.append(np.full(len(doc) + 1, self._next_doc, dtype=np.int64))
        self._buffered += len(doc) + 1
        self._next_doc += 1

    def _read_shard(self, path: Path, samples: int) -> list[np.ndarray]:
        return [decode_token_ids(sample, "tokens.npy", path, self.vocab_size)
                for sample in read_tar_samples(path, expected_samples=samples)]

    def state_dict(self) -> dict:
        """Plain-Python cursor: where the next batch starts, plus the leftover buffer."""
        tokens = np.concatenate(self._buf_tokens) if self._buf_tokens else np.zeros(0, np.int64)
        docs = np.concatenate(self._buf_docs) if self._buf_docs else np.zeros(0, np.int64)
        return {**super().state_dict(), "next_doc": self._next_doc, "buffer": tokens.tolist(),
                "buffer_docs": docs.tolist()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._next_doc = state["next_doc"]
        self._buf_tokens = [np.asarray(state["buffer"], dtype=np.int64)]
        self._buf_docs = [np.asarray(state["buffer_docs"], dtype=np.int64)]
        self._buffered = len(state["buffer"])
