"""What the token streams (text.py, sft.py) share: ShardCursor, one rank's place in its shards (which shard
and item come next, corrupt shards skipped, a plain-Python state that resumes exactly), and ShardStream, the
iterator around it that gives every rank the same number of batches an epoch."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from framework.data.shards import CorruptShardError, assign_shards, load_index

_PACKAGE = os.path.dirname(__file__)


class ShardCursor:
    """Items (documents, samples) of one rank's shards, one at a time, without end.

    Epoch e reads the shards assign_shards gives this rank for (seed, e), each one's items shuffled by
    (seed, e, shard), so (epoch, pass, shard_pos, item position) alone fixes what comes next. The stream
    decides when an epoch ends (start_epoch); until then the cursor rereads the epoch's list if it runs dry.
    A shard that cannot be read (read_shard raises CorruptShardError) is warned about, counted in
    stats["skipped_shards"] and never read again; more than max_skip_fraction of them is an error.

    read_shard(path, samples) returns a shard's items (samples: the index's count); pos_key names the item
    position in state_dict() ("doc_pos", "sample_pos"), and shape holds the stream's settings a saved
    position depends on (seq_len, micro_batch), so checkpoints keep the keys their stream always wrote.
    on_refill(paths), if given, runs before each refill pass and may raise. stats ("skipped_shards",
    "refills", then the stream's own `counters`, for it to count in) is saved and restored with the cursor.
    """

    def __init__(self, root: str | Path, shards: list[dict], rank: int, world: int, seed: int,
                 read_shard: Callable[[Path, int], list], pos_key: str, shape: dict[str, int] | None = None,
                 max_skip_fraction: float = 0.1, on_refill: Callable[[list[str]], None] | None = None,
                 counters: tuple[str, ...] = ()) -> None:
        self.root, self.shards, self.rank, self.world, self.seed = Path(root), shards, rank, world, seed
        self.read_shard, self.pos_key, self.shape = read_shard, pos_key, dict(shape or {})
        self.max_skip_fraction, self.on_refill = max_skip_fraction, on_refill
        self.stats: dict[str, int] = dict.fromkeys(("skipped_shards", "refills", *counters), 0)
        self._skipped: list[str] = []  # shard paths found corrupt, never read again
        self._seen: set[str] = set()
        self._cache: tuple[int, int, list] | None = None  # (epoch, shard id, shuffled items)
        self.start_epoch(0)  # raises now if there are too few shards for world

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def min_shards(self) -> int:
        """Shards this rank is sure to get in every epoch: floor(shards / world), whatever the permutation."""
        return len(self.shards) // self.world

    def start_epoch(self, epoch: int) -> None:
        """Go to the first item of `epoch`; skipped shards and stats are kept."""
        self._epoch, self._pass, self._shard_pos, self._item_pos = epoch, 0, 0, 0
        self._shard_list = assign_shards(len(self.shards), self.rank, self.world, self.seed, epoch)

    def next_item(self) -> Any:
        """The next item of this epoch; after the last shard, the epoch's shards again (a refill pass)."""
        while True:
            if self._shard_pos >= len(self._shard_list):
                self._refill()
            items = self._items(self._shard_list[self._shard_pos])
            if self._item_pos < len(items):
                self._item_pos += 1
                return items[self._item_pos - 1]
            self._shard_pos, self._item_pos = self._shard_pos + 1, 0

    def _refill(self) -> None:
        # The streams' len() assumes every shard of the epoch can be read, so only a corrupt shard (or an index
        # that overstates one) makes a rank run dry early. Reread this epoch's list rather than stop: every rank
        # must take the same number of steps, or the others wait forever in a ZeRO collective.
        paths = [self.shards[i]["path"] for i in self._shard_list]
        if all(p in self._skipped for p in paths):
            raise RuntimeError(f"rank {self.rank}: every shard of epoch {self._epoch} is corrupt: {paths}")
        if self.on_refill is not None:
            self.on_refill(paths)
        self._pass, self._shard_pos, self._item_pos = self._pass + 1, 0, 0
        self.stats["refills"] += 1

    def _items(self, shard_id: int) -> list:
        """This epoch's shuffled items of a shard ([] if the shard is corrupt); the last one is cached."""
        if self._cache is not None and self._cache[:2] == (self._epoch, shard_id):
            return self._cache[2]
        entry = self.shards[shard_id]
        if entry["path"] in self._skipped:
            return []
        self._seen.add(entry["path"])
        try:
            items = self.read_shard(self.root / entry["path"], entry["samples"])
        except CorruptShardError as e:
            self._skip(entry["path"], e)
            return []
        order = np.random.default_rng([self.seed, self._epoch, shard_id]).permutation(len(items))
        self._cache = (self._epoch, shard_id, [items[i] for i in order])
        return self._cache[2]

    def _skip(self, path: str, err: CorruptShardError) -> None:
        self._skipped.append(path)
        self.stats["skipped_shards"] += 1
        warnings.warn(f"{err}; skipping it", RuntimeWarning, stacklevel=_caller_outside_package())
        # Judge the fraction against at least a whole epoch's share so one early bad shard is not 100%.
        seen = max(len(self._seen), len(self._shard_list))
        if len(self._skipped) / seen > self.max_skip_fraction:
            raise RuntimeError(f"rank {self.rank}: {len(self._skipped)} of {seen} shards are corrupt, more than "
                               f"max_skip_fraction={self.max_skip_fraction}: {self._skipped}")

    def state_dict(self) -> dict:
        """The run's shape (checked on load) and the position of the next item, as plain Python."""
        return {"world": self.world, "rank": self.rank, "seed": self.seed, **self.shape,
                "num_shards": len(self.shards), "epoch": self._epoch, "pass": self._pass,
                "shard_pos": self._shard_pos, self.pos_key: self._item_pos, "skipped": list(self._skipped),
                "seen": sorted(self._seen), "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where state_dict() was taken; raises, changing nothing, if the shape differs."""
        mine = {"world": self.world, "rank": self.rank, "seed": self.seed, **self.shape,
                "num_shards": len(self.shards)}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"data state was saved with {key}={state.get(key)}, this stream has {value}: "
                                 f"it cannot resume this stream (restart the epoch instead)")
        self.start_epoch(int(state["epoch"]))
        self._pass, self._shard_pos, self._item_pos = state["pass"], state["shard_pos"], state[self.pos_key]
        self._skipped, self._seen = list(state["skipped"]), set(state["seen"])
        self.stats = dict(state["stats"])
        self._cache = None


class ShardStream:
    """Base of the token streams: an infinite iterator of len() batches an epoch, the same len() on every rank
    with no communication, then the next epoch (leftovers dropped so epochs stay independent).

    A subclass names its index FORMAT, how to make such shards (FORMAT_HINT, ending the wrong-format error),
    its state key for the position inside a shard (POS_KEY, the key its checkpoints have always had) and its
    own stats counters (COUNTERS), and keeps only what is its own: _check_index (its index fields),
    _read_shard (a shard's items), _shard_units and _batch_units (what a shard gives and a batch takes, in the
    stream's unit, from the index alone), _batch (one batch from self._cursor.next_item()), _reset (drop
    leftovers), and _end_pass if a pass over the epoch's shards can come back empty-handed.
    """

    FORMAT: str
    FORMAT_HINT: str
    POS_KEY: str
    COUNTERS: tuple[str, ...] = ()  # the subclass's own entries in stats

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch: int, rank: int, world: int, seed: int,
                 batch_multiple: int = 1, max_skip_fraction: float = 0.1) -> None:
        for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("batch_multiple", batch_multiple)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.seq_len, self.micro_batch, self.rank, self.world, self.seed = seq_len, micro_batch, rank, world, seed
        self.max_skip_fraction = max_skip_fraction
        self.index = load_index(data_dir)
        if self.index.get("format") != self.FORMAT:
            raise ValueError(f"{self.index['root']}/index.json has format {self.index.get('format')!r}, expected "
                             f"{self.FORMAT!r}{self.FORMAT_HINT}")
        self.root, self.shards = Path(self.index["root"]), self.index["shards"]
        self._check_index()
        self.eos_id, self.vocab_size = int(self.index["eos_id"]), int(self.index["vocab_size"])
        self._cursor = ShardCursor(self.root, self.shards, rank, world, seed, self._read_shard, self.POS_KEY,
                                   shape={"seq_len": seq_len, "micro_batch": micro_batch},
                                   max_skip_fraction=max_skip_fraction, on_refill=self._end_pass,
                                   counters=self.COUNTERS)
        self.batches_per_epoch = self._count_batches(batch_multiple)
        self.start_epoch(0)

    def _check_index(self) -> None:
        """Check the subclass's own index fields (self.index, self.shards); raise ValueError naming them."""

    def _read_shard(self, path: Path, samples: int) -> list:
        raise NotImplementedError

    def _shard_units(self) -> tuple[list[int], str]:
        """(what each shard gives, in the stream's unit, from the index alone; the unit's name)."""
        raise NotImplementedError

    def _batch_units(self) -> tuple[int, str]:
        """(units one batch takes; how that is made up, for the error when an epoch cannot fill one)."""
        raise NotImplementedError

    def _count_batches(self, batch_multiple: int) -> int:
        # Every rank gets at least floor(S / world) shards in every epoch, so the smallest shards taken that
        # many times bound what every rank reads: the same len() on all ranks and epochs, no communication.
        per_rank = self._cursor.min_shards
        sizes, unit = self._shard_units()
        per_batch, batch = self._batch_units()
        sure = sum(sorted(sizes)[:per_rank])
        batches = sure // per_batch // batch_multiple * batch_multiple
        if batches == 0:
            raise ValueError(f"{self.root}: a rank is only sure to get {sure} {unit} ({per_rank} of "
                             f"{len(self.shards)} shards, world {self.world}) but one epoch needs {batch} x "
                             f"batch_multiple {batch_multiple} = {per_batch * batch_multiple}: use more data or "
                             f"smaller batches")
        return batches

    def _batch(self) -> dict:
        raise NotImplementedError

    def _reset(self) -> None:
        """Drop what is buffered across batches: a new epoch starts."""

    def _end_pass(self, paths: list[str]) -> None:
        """The cursor is about to reread the epoch's shards (a refill pass); may raise."""

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch the next batch comes from."""
        return self._cursor.epoch

    @property
    def stats(self) -> dict[str, int]:
        """Counters: "skipped_shards" (corrupt, never reread), "refills" (passes reread to fill an epoch), and
        the subclass's own."""
        return self._cursor.stats

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> dict:
        batch = self._batch()
        self._batches += 1
        if self._batches >= self.batches_per_epoch:
            self.start_epoch(self.epoch + 1)  # leftovers are dropped so epochs stay independent
        return batch

    def start_epoch(self, epoch: int) -> None:
        """Jump to the beginning of `epoch` (also used when the world size changed on resume)."""
        self._cursor.start_epoch(epoch)
        self._batches = 0
        self._reset()

    def state_dict(self) -> dict:
        """Plain-Python cursor: where the next batch starts (a subclass adds what it buffers)."""
        return {**self._cursor.state_dict(), "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where state_dict() was taken; the run's shape must match."""
        self._cursor.load_state_dict(state)  # checks the run's shape first
        self._batches = state["batches"]


def _caller_outside_package() -> int:
    """stacklevel, for the function calling this, of the nearest frame outside framework/data: a corrupt
    shard is found a few calls deep in a stream, and its warning should point at the code that asked for
    the batch (the training loop), whichever path led there."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == _PACKAGE:
        frame, level = frame.f_back, level + 1
    return level
