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

from framework.data.shards import CorruptShardError, assign_shards, decode_npy, load_index, read_tar_samples

FORMAT = "sft-v1"
_CHECKED = ("world", "rank", "seed", "seq_len", "micro_batch", "num_shards")

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


class SFTStream:
    """Infinite iterator of SFT batches, len() batches an epoch, the same number on every rank:

    - input_ids (B, seq_len) int64: prompt ids, response ids, then EOS to the end (the first EOS ends the
      answer, the rest is padding the model also learns to produce, as LLaDA's SFT does);
    - prompt_len (B,) int64; answer_len (B,) int64 = len(response) + 1 (the answer including its first EOS).

    One sample per row, never packed. A sample longer than seq_len (prompt + response + EOS) is skipped and
    counted in stats["too_long"], never truncated; the index tells how many there are, so len() excludes
    them. Each epoch shuffles the shard order (assign_shards) and the samples inside each shard from
    (seed, epoch).
    """

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch: int, rank: int, world: int, seed: int,
                 batch_multiple: int = 1, max_skip_fraction: float = 0.1) -> None:
        for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("batch_multiple", batch_multiple)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.index = load_index(data_dir)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{self.index['root']}/index.json has format {self.index.get('format')!r}, expected "
                             f"{FORMAT!r}: build SFT shards with data/sft_to_shards.py or data/make_tasks.py")
        self.root, self.shards = Path(self.index["root"]), self.index["shards"]
        for i, s in enumerate(self.shards):
            if not (isinstance(s.get("lengths"), list) and all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in s["lengths"])):
                raise ValueError(f"{self.root}/index.json: shards[{i}] needs a 'lengths' list of [length, count]")
        self.eos_id, self.vocab_size = int(self.index["eos_id"]), int(self.index["vocab_size"])
        self.pad_id, self.mask_id = self.index.get("pad_id"), self.index.get("mask_id")
        self.seq_len, self.micro_batch, self.rank, self.world, self.seed = seq_len, micro_batch, rank, world, seed
        self.max_skip_fraction = max_skip_fraction
        # Samples of each shard that fit seq_len, from the index alone.
        self._fits = [sum(c for length, c in s["lengths"] if length <= seq_len) for s in self.shards]
        total = sum(int(s["samples"]) for s in self.shards)
        self.too_long_in_index = total - sum(self._fits)
        if self.too_long_in_index:
            warnings.warn(f"{self.root}: {self.too_long_in_index} of {total} samples are longer than seq_len "
                          f"{seq_len} (prompt + response + EOS); they are skipped, never truncated",
                          RuntimeWarning, stacklevel=2)
        self.batches_per_epoch = self._count_batches(batch_multiple)
        self.stats = {"skipped_shards": 0, "refills": 0, "too_long": 0}
        self._skipped: list[str] = []  # shard paths found corrupt, never read again
        self._seen: set[str] = set()
        self._cache: tuple[int, int, list[Sample]] | None = None  # (epoch, shard id, shuffled samples)
        self.start_epoch(0)

    def _count_batches(self, batch_multiple: int) -> int:
        # Every rank gets at least floor(S / world) shards in every epoch, so the smallest shards taken that
        # many times bound every rank's samples: the same number on all ranks and epochs, no communication.
        assign_shards(len(self.shards), self.rank, self.world, self.seed, 0)  # raises if too few shards
        per_rank = len(self.shards) // self.world
        samples = sum(sorted(self._fits)[:per_rank])
        batches = samples // self.micro_batch // batch_multiple * batch_multiple
        if batches == 0:
            raise ValueError(
                f"{self.root}: a rank is only sure to get {samples} samples that fit seq_len {self.seq_len} "
                f"({per_rank} of {len(self.shards)} shards, world {self.world}; {self.too_long_in_index} samples "
                f"too long) but one epoch needs micro_batch {self.micro_batch} x batch_multiple {batch_multiple} "
                f"= {self.micro_batch * batch_multiple}: use more data, a longer seq_len or smaller batches")
        return batches

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch the next batch comes from."""
        return self._epoch

    def __iter__(self) -> SFTStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [self._next_sample() for _ in range(self.micro_batch)]
        ids = torch.full((self.micro_batch, self.seq_len), self.eos_id, dtype=torch.int64)
        for row, (prompt, response) in enumerate(rows):
            ids[row, :len(prompt) + len(response)] = torch.from_numpy(np.concatenate([prompt, response]))
        batch = {"input_ids": ids,
                 "prompt_len": torch.tensor([len(p) for p, _ in rows], dtype=torch.int64),
                 "answer_len": torch.tensor([len(r) + 1 for _, r in rows], dtype=torch.int64)}
        self._batches += 1
        if self._batches >= self.batches_per_epoch:
            self.start_epoch(self._epoch + 1)  # leftover samples are dropped so epochs stay independent
        return batch

    def start_epoch(self, epoch: int) -> None:
        """Jump to the beginning of `epoch` (also used when the world size changed on resume)."""
        self._epoch, self._pass, self._shard_pos, self._sample_pos, self._batches = epoch, 0, 0, 0, 0
        self._pass_yield = 0  # samples given in this pass over the shard list (0 at its end: nothing fits)
        self._shard_list = assign_shards(len(self.shards), self.rank, self.world, self.seed, epoch)

    def _next_sample(self) -> Sample:
        while True:
            if self._shard_pos >= len(self._shard_list):
                # Only a corrupt shard (or an index that lies) can make a rank run dry before len() batches:
                # reread this epoch's list so every rank still takes the same number of steps.
                paths = [self.shards[i]["path"] for i in self._shard_list]
                if all(p in self._skipped for p in paths):
                    raise RuntimeError(f"rank {self.rank}: every shard of epoch {self._epoch} is corrupt: {paths}")
                if self._pass_yield == 0:
                    raise RuntimeError(f"rank {self.rank}: no sample of {paths} fits seq_len {self.seq_len}, "
                                       f"although {self.root}/index.json says some do")
                self._pass, self._shard_pos, self._sample_pos, self._pass_yield = self._pass + 1, 0, 0, 0
                self.stats["refills"] += 1
            samples = self._shard_samples(self._shard_list[self._shard_pos])
            if self._sample_pos >= len(samples):
                self._shard_pos, self._sample_pos = self._shard_pos + 1, 0
                continue
            prompt, response = samples[self._sample_pos]
            self._sample_pos += 1
            if len(prompt) + len(response) + 1 > self.seq_len:
                self.stats["too_long"] += 1
                continue
            self._pass_yield += 1
            return prompt, response

    def _shard_samples(self, shard_id: int) -> list[Sample]:
        """This epoch's shuffled samples of a shard ([] if the shard is corrupt)."""
        if self._cache is not None and self._cache[:2] == (self._epoch, shard_id):
            return self._cache[2]
        entry = self.shards[shard_id]
        if entry["path"] in self._skipped:
            return []
        self._seen.add(entry["path"])
        try:
            samples = self._read_shard(self.root / entry["path"], entry["samples"])
        except CorruptShardError as e:
            self._skip(entry["path"], e)
            return []
        order = np.random.default_rng([self.seed, self._epoch, shard_id]).permutation(len(samples))
        self._cache = (self._epoch, shard_id, [samples[i] for i in order])
        return self._cache[2]

    def _read_shard(self, path: Path, count: int) -> list[Sample]:
        samples = []
        for sample in read_tar_samples(path, expected_samples=count):
            parts = []
            for ext in ("prompt.npy", "response.npy"):
                if ext not in sample:
                    raise CorruptShardError(path, f"sample {sample['__key__']!r} has no {ext}")
                ids = decode_npy(sample[ext], path)
                if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids.size and not 0 <= ids.min() <= ids.max()
                                                                     < self.vocab_size):
                    raise CorruptShardError(path, f"sample {sample['__key__']!r}: {ext} must be a 1-D integer "
                                                  f"array in [0, {self.vocab_size}), got {ids.dtype} {ids.shape}")
                parts.append(ids.astype(np.int64))
            if parts[1].size == 0:
                raise CorruptShardError(path, f"sample {sample['__key__']!r} has an empty response")
            samples.append((parts[0], parts[1]))
        return samples

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
        """Plain-Python cursor: where the next batch starts."""
        return {"world": self.world, "rank": self.rank, "seed": self.seed, "seq_len": self.seq_len,
                "micro_batch": self.micro_batch, "num_shards": len(self.shards), "epoch": self._epoch,
                "pass": self._pass, "shard_pos": self._shard_pos, "sample_pos": self._sample_pos,
                "pass_yield": self._pass_yield, "batches": self._batches, "skipped": list(self._skipped),
                "seen": sorted(self._seen), "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where state_dict() was taken; the run's shape must match."""
        for key in _CHECKED:
            mine = len(self.shards) if key == "num_shards" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"data state was saved with {key}={state.get(key)}, this stream has {mine}: "
                                 f"it cannot resume this stream (restart the epoch instead)")
        self.start_epoch(int(state["epoch"]))
        self._pass, self._shard_pos, self._sample_pos = state["pass"], state["shard_pos"], state["sample_pos"]
        self._pass_yield, self._batches = state["pass_yield"], state["batches"]
        self._skipped, self._seen = list(state["skipped"]), set(state["seen"])
        self.stats = dict(state["stats"])
        self._cache = None
