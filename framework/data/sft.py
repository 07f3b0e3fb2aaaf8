"""Supervised fine-tuning batches (prompt, answer, EOS padding) over SFT shards; exact-match scoring.

Shards are written by data/sft_to_shards.py (or data/make_tasks.py): KEY.prompt.npy and KEY.response.npy
(int32, no EOS) per sample and an index.json whose per-shard "lengths" histogram lets every rank count its
batches without reading a shard or talking to another rank.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from framework.data.cursor import ShardStream
from framework.data.shards import CorruptShardError, decode_token_ids, read_tar_samples

FORMAT = "sft-v1"

Sample = tuple[np.ndarray, np.ndarray]  # (prompt ids, response ids)


def exact_match(prediction: str, reference: str) -> bool:
    """True when the texts are equal up to whitespace (runs of spaces, newlines, leading/trailing)."""
    return prediction.split() == reference.split()


def left_pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts for batched decoding: (ids (B, P) int64 padded on the left with pad_id,
    mask (B, P) bool, True on real tokens), P the longest prompt. Left padding puts every answer's first
    position at the same column P."""
    width = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.int64)
            mask[row, width - len(prompt):] = True
    return ids, mask


class SFTStream(ShardStream):
    """Infinite iterator of SFT batches, len() batches an epoch, the same number on every rank:

    - input_ids (B, seq_len) int64: prompt ids, response ids, then EOS to the end (the first EOS ends the
      answer, the rest is padding the model also learns to produce, as LLaDA's SFT does);
    - prompt_len (B,) int64; answer_len (B,) int64 = len(response) + 1 (the answer including its first EOS).

    One sample per row, never packed. A sample longer than seq_len (prompt + response + EOS) is skipped and
    counted in stats["too_long"], never truncated; the index tells how many there are, so len() excludes
    them. Each epoch shuffles the shard order (assign_shards) and the samples inside each shard from
    (seed, epoch).
    """

    FORMAT = FORMAT
    FORMAT_HINT = ": build SFT shards with data/sft_to_shards.py or data/make_tasks.py"
    POS_KEY = "sample_pos"
    COUNTERS = ("too_long",)

    def _check_index(self) -> None:
        for i, s in enumerate(self.shards):
            if not (isinstance(s.get("lengths"), list) and all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in s["lengths"])):
                raise ValueError(f"{self.root}/index.json: shards[{i}] needs a 'lengths' list of [length, count]")
        self.pad_id, self.mask_id = self.index.get("pad_id"), self.index.get("mask_id")
        # Samples of each shard that fit seq_len, from the index alone.
        self._fits = [sum(c for length, c in s["lengths"] if length <= self.seq_len) for s in self.shards]
        total = sum(int(s["samples"]) for s in self.shards)
        self.too_long_in_index = total - sum(self._fits)
        if self.too_long_in_index:
            # stacklevel 3: past ShardStream.__init__, to the code that made the stream.
            warnings.warn(f"{self.root}: {self.too_long_in_index} of {total} samples are longer than seq_len "
                          f"{self.seq_len} (prompt + response + EOS); they are skipped, never truncated",
                          RuntimeWarning, stacklevel=3)

    def _shard_units(self) -> tuple[list[int], str]:
        return self._fits, f"samples that fit seq_len {self.seq_len}"

    def _batch_units(self) -> tuple[int, str]:
        return self.micro_batch, f"micro_batch {self.micro_batch}"

    def _batch(self) -> dict[str, torch.Tensor]:
        rows = [self._next_sample() for _ in range(self.micro_batch)]
        ids = torch.full((self.micro_batch, self.seq_len), self.eos_id, dtype=torch.int64)
        for row, (prompt, response) in enumerate(rows):
            ids[row, :len(prompt) + len(response)] = torch.from_numpy(np.concatenate([prompt, response]))
        return {"input_ids": ids,
                "prompt_len": torch.tensor([len(p) for p, _ in rows], dtype=torch.int64),
                "answer_len": torch.tensor([len(r) + 1 for _, r in rows], dtype=torch.int64)}

    def _reset(self) -> None:
        self._pass_yield = 0  # samples given in this pass over the shard list (0 at its end: nothing fits)

    def _next_sample(self) -> Sample:
        while True:
            prompt, response = self._cursor.next_item()
            if len(prompt) + len(response) + 1 > self.seq_len:
                self.stats["too_long"] += 1
                continue
            self._pass_yield += 1
            return prompt, response

    def _end_pass(self, paths: list[str]) -> None:
        # The cursor is about to reread the epoch's shards. If a whole pass gave no sample, every sample the
        # index counted as fitting was too long after all: rereading would loop forever.
        if self._pass_yield == 0:
            raise RuntimeError(f"rank {self.rank}: no sample of {paths} fits seq_len {self.seq_len}, "
                               f"although {self.root}/index.json says some do")
        self._pass_yield = 0

    def _read_shard(self, path: Path, count: int) -> list[Sample]:
        samples = []
        for sample in read_tar_samples(path, expected_samples=count):
            prompt, response = (decode_token_ids(sample, ext, path, self.vocab_size).astype(np.int64)
                                for ext in ("prompt.npy", "response.npy"))
            if response.size == 0:
                raise CorruptShardError(path, f"sample {sample['__key__']!r} has an empty response")
            samples.append((prompt, response))
        return samples

    def state_dict(self) -> dict:
        """Plain-Python cursor: where the next batch starts."""
        return {**super().state_dict(), "pass_yield": self._pass_yield}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pass_yield = state["pass_yield"]
