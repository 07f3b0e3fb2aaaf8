"""Bucketed video clip stream over video shards: same bucket on every rank each step, exact mid-epoch resume;
optionally each clip's audio, cut to the clip's time window."""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from framework.data.audio_decode import (
    LAYOUTS,
    MISSING_AUDIO,
    NoAudioError,
    decode_audio_window,
    window_samples,
)
from framework.data.buckets import Bucket, assign_bucket, epoch_schedule, usable_duration
from framework.data.shards import CorruptShardError, assign_shards, load_index
from framework.data.video_decode import CorruptVideoError, choose_start, clip_times, decode_clip, resize_crop

FORMAT = "video-v1"
MIN_SEEN = 20  # clips seen before max_skip_fraction is enforced: one early failure must not stop a run
_KEEP_SKIPPED = 100  # failed clips remembered by name (the state dict stays small on a long run)
_MIN_DRAWS = 16  # replacement clips tried, at least, for a batch whose every clip failed
_SURE = 1e-9  # give up drawing once this many failures in a row would be this unlikely within max_skip_fraction
_CHECKED = ("world", "rank", "seed", "fps", "batch_multiple", "buckets", "num_shards")
_ITEM_FIELDS = ("key", "width", "height", "duration", "offset", "size")
AUDIO_SUFFIXES = ("flac", "wav")  # a separate audio track KEY.flac / KEY.wav (as data/video_shards.py writes it)

Plan = list[tuple[int, list[tuple[int, int]]]]  # per batch: (bucket id, [(shard id, item index), ...])


def key_seed(key: str) -> int:
    """A stable 63-bit integer for a sample key (Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def max_draws(max_skip_fraction: float) -> int | None:
    """How many replacement clips a batch whose every clip failed may draw (None: all the candidates). With at
    most max_skip_fraction = f of the clips unreadable, d draws all fail with probability f ** d: stop once that
    is below _SURE, since the run is then surely over its limit (the stream stops it), not unlucky."""
    if max_skip_fraction >= 1.0:
        return None
    if max_skip_fraction <= 0.0:
        return _MIN_DRAWS
    return max(_MIN_DRAWS, math.ceil(math.log(_SURE) / math.log(max_skip_fraction)))


def pick_caption(captions: list[str], seed: int, epoch: int, key: str) -> str:
    """One caption per visit; each block of len(captions) epochs uses every caption once, in a seeded order."""
    cycle, visit = divmod(epoch, len(captions))
    order = np.random.default_rng([seed, cycle, key_seed(key)]).permutation(len(captions))
    return captions[int(order[visit])]


_MEMBERS: dict[str, dict[str, tuple[int, int]]] = {}  # per process: shard path -> member name -> (offset, size)


def _members(path: Path) -> dict[str, tuple[int, int]]:
    """Data offset and size of every file in a tar (one header scan per shard and process, then cached)."""
    if str(path) not in _MEMBERS:
        try:
            with tarfile.open(path, mode="r:") as tar:
                _MEMBERS[str(path)] = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CorruptShardError(path, f"{type(e).__name__}: {e}") from None
    return _MEMBERS[str(path)]


def _read(path: Path, offset: int, size: int, what: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise CorruptShardError(path, f"{what}: wanted {size} bytes at {offset}, the file holds {len(data)}")
    return data


def _captions(path: Path, item: dict) -> list[str]:
    """KEY.json's "captions" (located by json_offset/json_size when the index has them), else KEY.txt."""
    key = item["key"]
    if "json_offset" in item:
        span = (item["json_offset"], item["json_size"])
    else:  # video-v1 indexes written by data/video_shards.py only locate the mp4
        span = _members(path).get(f"{key}.json")
    if span is not None:
        try:
            caps = json.loads(_read(path, *span, f"{key}.json")).get("captions")
        except (ValueError, AttributeError) as e:  # bad UTF-8 or JSON, or not an object
            raise CorruptShardError(path, f"{key}.json: {e}") from None
        if isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps):
            return caps
    span = _members(path).get(f"{key}.txt")
    if span is None:
        raise CorruptShardError(path, f"sample {key!r} has no captions in {key}.json and no {key}.txt")
    return [_read(path, *span, f"{key}.txt").decode("utf-8", errors="replace")]


def _audio_span(path: Path, item: dict) -> tuple[int, int] | None:
    """(offset, size) of the sample's separate audio track, from the index or the tar's members; None when its
    audio (if any) is in the video file."""
    if "audio_offset" in item:
        return item["audio_offset"], item["audio_size"]
    members = _members(path)
    return next((members[f"{item['key']}.{s}"] for s in AUDIO_SUFFIXES if f"{item['key']}.{s}" in members), None)


class _EpochBatches(Dataset):
    """Map-style view of one epoch's planned batches from `start` on; item i is a whole decoded batch plus
    "skipped": the (shard, key, reason) of clips that failed and were replaced, "drawn": how many replacement
    clips were tried, "candidates": how many there were (and, with audio, "no_audio": the keys of clips kept
    silent)."""

    def __init__(self, root: Path, shards: list[dict], buckets: list[Bucket], plan: Plan, start: int, fps: float,
                 seed: int, epoch: int, random_crop: bool, dtype: torch.dtype, audio_rate: int = 0,
                 audio_channels: int = 1, missing_audio: str = "silent", draws: int | None = _MIN_DRAWS) -> None:
        self.root, self.shards, self.buckets, self.plan, self.start = root, shards, buckets, plan, start
        self.fps, self.seed, self.epoch, self.random_crop, self.dtype = fps, seed, epoch, random_crop, dtype
        self.audio_rate, self.audio_channels, self.missing_audio = audio_rate, audio_channels, missing_audio
        self.draws = draws

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def clip(self, shard_id: int, item_idx: int, bucket: Bucket) -> tuple[np.ndarray, np.random.Generator]:
        """This epoch's timestamps (T,) of an item, and the generator its crop draws from."""
        item = self.shards[shard_id]["items"][item_idx]
        rng = np.random.default_rng([self.seed, self.epoch, key_seed(item["key"])])
        duration = usable_duration(item)
        start = choose_start(duration, bucket.seconds(self.fps), rng, float(item.get("fps") or 0.0))
        return clip_times(duration, self.fps, bucket.frames, start), rng

    def load(self, shard_id: int, item_idx: int, bucket: Bucket, out: torch.Tensor,
             audio: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[str, bool]:
        """Decode one clip into out (3, T, H, W) (float32 in [-1, 1], or uint8), and its audio into audio =
        (samples (C, S), mask (S,)) when given; returns (caption, whether it had audio). Raises
        CorruptVideoError (NoAudioError under missing_audio="skip") or CorruptShardError."""
        shard, item = self.shards[shard_id], self.shards[shard_id]["items"][item_idx]
        path = self.root / shard["path"]
        times, rng = self.clip(shard_id, item_idx, bucket)
        caption = pick_caption(_captions(path, item), self.seed, self.epoch, item["key"])
        data = _read(path, item["offset"], item["size"], f"{item['key']}.mp4")
        frames = decode_clip(data, times, num_threads=1)  # one decoder thread: parallelism comes from the workers
        had_audio = audio is None or self.load_audio(path, item, data, float(times[0]), bucket, *audio)
        resize_crop(frames, bucket.height, bucket.width, rng if self.random_crop else None, out=out)
        return caption, had_audio

    def load_audio(self, path: Path, item: dict, video: bytes, start: float, bucket: Bucket,
                   samples: torch.Tensor, mask: torch.Tensor) -> bool:
        """The audio of the clip's window [start, start + frames / fps): the frames sampled at start + i / fps
        each stand for 1 / fps of time, so the window is what the clip shows, and its length only depends on
        the bucket. From KEY.flac / KEY.wav when the sample has one, else from the video file. False: no
        audio, kept silent (zeros, mask False)."""
        span = _audio_span(path, item)
        data = video if span is None else _read(path, *span, f"{item['key']} audio")
        try:
            wave, valid = decode_audio_window(data, start, bucket.seconds(self.fps), self.audio_rate,
                                              self.audio_channels)
        except NoAudioError:
            if self.missing_audio == "skip":
                raise
            samples.zero_()
            mask.zero_()
            return False
        samples.copy_(torch.from_numpy(wave))
        mask.copy_(torch.from_numpy(valid))
        return True

    def __getitem__(self, i: int) -> dict:
        bucket_id, refs = self.plan[self.start + i]
        bucket = self.buckets[bucket_id]
        keys = [self.shards[s]["items"][j]["key"] for s, j in refs]
        video = _video_batch(len(refs), bucket, self.dtype)
        audio = mask = None
        if self.audio_rate:
            n = window_samples(bucket.seconds(self.fps), self.audio_rate)
            audio = _batch_tensor((len(refs), self.audio_channels, n), torch.float32)
            mask = _batch_tensor((len(refs), n), torch.bool)
        failed = []  # (shard path, key, reason); the main process warns and counts
        silent = []  # keys of clips without audio, kept silent

        def attempt(k: int, ref: tuple[int, int]) -> str | None:
            """Load clip ref into slot k: its caption, or None (recorded in failed) when it cannot be loaded."""
            s, j = ref
            key = self.shards[s]["items"][j]["key"]
            try:
                caption, had_audio = self.load(s, j, bucket, video[k], None if audio is None else (audio[k], mask[k]))
            except (CorruptVideoError, CorruptShardError, OSError) as e:
                failed.append((self.shards[s]["path"], key, getattr(e, "reason", str(e))))
                return None
            if not had_audio:
                silent.append(key)
            return caption

        captions = [attempt(k, ref) for k, ref in enumerate(refs)]
        candidates, drawn = [], 0
        if not any(c is not None for c in captions):
            # Nothing to fill the batch from (batch size 1: one bad file): draw other clips of the bucket instead,
            # in a seeded order, so resume stays exact; the batch count is unchanged, so ranks stay in step.
            candidates = self.candidates(self.start + i)
            for ref in candidates[:self.draws]:
                drawn += 1
                captions[0] = attempt(0, ref)
                if captions[0] is not None:
                    keys[0] = self.shards[ref[0]]["items"][ref[1]]["key"]
                    break
        good = [k for k, c in enumerate(captions) if c is not None]
        extra = {} if audio is None else {"audio": audio, "audio_mask": mask, "audio_rate": self.audio_rate,
                                          "no_audio": silent}
        tally = {"skipped": failed, "drawn": drawn, "candidates": len(candidates)}
        if not good:
            return {"video": None, "caption": [], "key": keys, "bucket": bucket_id, "fps": self.fps, **tally,
                    **extra}
        # A failed clip takes the next good clip of its batch: batches never shrink, so ranks never desync.
        src = [k if captions[k] is not None else next((g for g in good if g > k), good[0]) for k in range(len(refs))]
        for k, g in enumerate(src):
            if k != g:
                for t in (video, audio, mask):
                    if t is not None:
                        t[k].copy_(t[g])
        return {"video": video, "caption": [captions[g] for g in src], "key": [keys[g] for g in src],
                "bucket": bucket_id, "fps": self.fps, **tally, **extra}

    def candidates(self, index: int) -> list[tuple[int, int]]:
        """Replacements for batch `index` of the plan: this rank's other clips of its bucket this epoch, in an
        order seeded by (seed, epoch, batch index): a pure function of the plan, whichever worker asks."""
        bucket_id, refs = self.plan[index]
        pool = sorted({ref for b, batch in self.plan if b == bucket_id for ref in batch} - set(refs))
        order = np.random.default_rng([self.seed, self.epoch, index, bucket_id]).permutation(len(pool))
        return [pool[k] for k in order]


def _bucket_name(bucket: Bucket) -> str:
    return f"{bucket.height}x{bucket.width}x{bucket.frames}:{bucket.batch_size}"  # as data.buckets spells it


def _why_no_draw(drawn: int, candidates: int, max_skip_fraction: float) -> str:
    """The end of the error for a batch nothing could be loaded for."""
    if candidates == 0:
        return "and this rank has no other clip of that bucket this epoch to draw instead"
    if drawn < candidates:
        return (f"and so did the {drawn} clips drawn to replace them: that many failures in a row mean far more "
                f"than max_skip_fraction={max_skip_fraction} of the data is unreadable")
    return f"and so did all {candidates} other clips of that bucket this rank has this epoch: none is readable"


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised batch; in a DataLoader worker it lives in shared memory from the start."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    # As DataLoader's own collate does: sending a shared tensor to the main process then copies no pixels.
    # Workers also convert to float, so the main process (the trainer) only receives; fresh shared pages are
    # costly to touch, though (~0.4 ms/MB), which is what uint8 output saves.
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _video_batch(size: int, bucket: Bucket, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised (B, 3, T, H, W) clips. uint8 clips are stored frame by frame with interleaved RGB, as decoders
    return them, and handed out as a permuted view of that memory: each clip's pixels are then one straight copy
    into the batch rather than a planar transpose (measured 0.015 vs 0.08 ms per 256x256 frame, the larger part of
    what the loader added to decoding), and to_unit_range, which the recipes apply on the device, writes the usual
    contiguous float32 layout. float32 clips go to the model as they are, so they keep the contiguous layout."""
    if dtype != torch.uint8:
        return _batch_tensor((size, 3, bucket.frames, bucket.height, bucket.width), dtype)
    return _batch_tensor((size, bucket.frames, bucket.height, bucket.width, 3), dtype).permute(0, 4, 1, 2, 3)


def _init_worker(worker_id: int) -> None:
    # Each worker is one decoding lane; intra-op threads in every worker would oversubscribe the cores.
    torch.set_num_threads(1)


class VideoStream:
    """Infinite iterator of {"video": (B, 3, T, H, W) float32 in [-1, 1], "caption", "key", "bucket", "fps"}.

    B, T, H, W come from the step's bucket, identical on all ranks; len() is this epoch's number of batches.
    uint8=True yields the pixels as uint8 0..255 instead (a quarter of the shared memory and host-to-device
    copy); convert on the device with video_decode.to_unit_range.

    audio_rate > 0 adds "audio" (B, audio_channels, S) float32, "audio_mask" (B, S) bool (False where there was
    no audio) and "audio_rate": each clip's audio over the time its frames cover, [t0, t0 + T / fps) for a clip
    sampled at t0 + i / fps, with S = round(T / fps * audio_rate) (audio_decode.decode_audio_window). A clip
    without audio is kept silent (missing_audio="silent", counted in stats["no_audio"]) or replaced like a
    corrupt one ("skip").

    A clip that cannot be loaded is replaced by another clip of its batch; when none of the batch loads (batch
    size 1: one bad file) clips drawn from this rank's other clips of the bucket this epoch, in a seeded order,
    take its place. Either way the batch keeps its size and ranks stay in step. stats["skipped"] counts the
    failures and stats["seen"] every clip tried (draws included); the stream raises when more than
    max_skip_fraction of those failed (after MIN_SEEN clips), or when no clip could be found for a batch.
    """

    def __init__(self, data_dir: str | Path, buckets: list[Bucket], rank: int, world: int, seed: int, fps: float,
                 batch_multiple: int = 1, num_workers: int = 0, max_skip_fraction: float = 0.05,
                 random_crop: bool = False, uint8: bool = False, audio_rate: int = 0, audio_channels: int = 1,
                 missing_audio: str = "silent") -> None:
        if fps <= 0 or batch_multiple < 1 or num_workers < 0:
            raise ValueError(f"need fps > 0, batch_multiple >= 1, num_workers >= 0; got {fps}, "
                             f"{batch_multiple}, {num_workers}")
        if (audio_rate != int(audio_rate) or audio_rate < 0 or audio_channels not in LAYOUTS
                or missing_audio not in MISSING_AUDIO):
            raise ValueError(f"need an integer audio_rate >= 0 (0: no audio), audio_channels in {tuple(LAYOUTS)} "
                             f"and missing_audio in {MISSING_AUDIO}; got {audio_rate}, {audio_channels}, "
                             f"{missing_audio!r}")
        if not buckets:
            raise ValueError("need at least one bucket")
        index = load_index(data_dir)
        if index.get("format") != FORMAT:
            raise ValueError(f"{index['root']}/index.json has format {index.get('format')!r}, expected "
                             f"{FORMAT!r} (written by data/video_shards.py)")
        self.root, self.shards = Path(index["root"]), index["shards"]
        for shard in self.shards:
            items = shard.get("items")
            if not isinstance(items, list) or any(not all(f in it for f in _ITEM_FIELDS) for it in items):
                raise ValueError(f"{self.root}/index.json: shard {shard['path']} needs an 'items' list whose "
                                 f"entries have {_ITEM_FIELDS}")
        self.buckets, self.rank, self.world, self.seed, self.fps = list(buckets), rank, world, seed, float(fps)
        self.batch_multiple, self.num_workers = batch_multiple, num_workers
        self.max_skip_fraction, self.random_crop, self.uint8 = max_skip_fraction, random_crop, uint8
        self.audio_rate, self.audio_channels, self.missing_audio = int(audio_rate), audio_channels, missing_audio
        # Bucket choice depends only on an item's metadata, so every rank computes the same table.
        self._bucket_of = [[assign_bucket(it, self.buckets, self.fps) for it in s["items"]] for s in self.shards]
        self._counts = [Counter(b for b in bs if b is not None) for bs in self._bucket_of]
        self.too_short_keys = [it["key"] for s, bs in zip(self.shards, self._bucket_of)
                               for it, b in zip(s["items"], bs) if b is None]
        self.stats = {"seen": 0, "skipped": 0, "too_short": len(self.too_short_keys)}
        if self.audio_rate:
            self.stats["no_audio"] = 0  # clips kept silent (missing_audio="silent")
        self._skipped: list[str] = []  # "shard:key (reason)" of the latest replaced clips, for the error message
        self._plans: dict[int, Plan] = {}
        self._iter: Iterator[dict] | None = None
        self._epoch, self._batch = 0, 0
        self.start_epoch(0)

    # ---- planning: pure functions of (index, buckets, seed, epoch, world) ----

    def _plan(self, epoch: int) -> Plan:
        if epoch in self._plans:
            return self._plans[epoch]
        mine: list[int] = []
        counts = []
        for r in range(self.world):
            shard_ids = assign_shards(len(self.shards), r, self.world, self.seed, epoch)
            counts.append(sum((self._counts[s] for s in shard_ids), Counter()))
            mine = shard_ids if r == self.rank else mine
        schedule = epoch_schedule(counts, self.buckets, self.seed, epoch, self.batch_multiple)
        groups: dict[int, list[tuple[int, int]]] = {b: [] for b in range(len(self.buckets))}
        for s in mine:
            for j, b in enumerate(self._bucket_of[s]):
                if b is not None:
                    groups[b].append((s, j))
        for b, group in groups.items():
            order = np.random.default_rng([self.seed, epoch, self.rank, b]).permutation(len(group))
            groups[b] = [group[i] for i in order]
        cursor, plan = Counter(), []
        for b in schedule:
            size = self.buckets[b].batch_size
            plan.append((b, groups[b][cursor[b]:cursor[b] + size]))
            cursor[b] += size
        # The current epoch and one looked-up epoch are enough: the stream only moves forward.
        self._plans = {e: p for e, p in self._plans.items() if e == self._epoch}
        self._plans[epoch] = plan
        return plan

    def batches_in_epoch(self, epoch: int) -> int:
        """Number of batches epoch `epoch` has (the same on every rank)."""
        return len(self._plan(epoch))

    def _dataset(self, epoch: int, start: int) -> _EpochBatches:
        return _EpochBatches(self.root, self.shards, self.buckets, self._plan(epoch), start, self.fps, self.seed,
                             epoch, self.random_crop, torch.uint8 if self.uint8 else torch.float32,
                             self.audio_rate, self.audio_channels, self.missing_audio,
                             max_draws(self.max_skip_fraction))

    def planned_clips(self, epoch: int, start: int, count: int) -> list[tuple[Path, str, int, int, np.ndarray]]:
        """(shard file, key, mp4 offset, mp4 size, timestamps (T,)) of each clip of `count` batches from `start`."""
        ds, out = self._dataset(epoch, 0), []
        for b, refs in ds.plan[start:start + count]:
            for s, j in refs:
                item = self.shards[s]["items"][j]
                out.append((self.root / self.shards[s]["path"], item["key"], item["offset"], item["size"],
                            ds.clip(s, j, self.buckets[b])[0]))
        return out

    # ---- iteration ----

    def __len__(self) -> int:
        return len(self._plan(self._epoch))

    @property
    def epoch(self) -> int:
        """Epoch the next batch comes from."""
        return self._epoch

    def start_epoch(self, epoch: int) -> None:
        """Jump to the beginning of `epoch` (also used when the world size changed on resume)."""
        self._close()
        if self.batches_in_epoch(epoch) == 0:
            raise ValueError(f"{self.root}: epoch {epoch} has no batch: no bucket has a full batch on every rank "
                             f"(world {self.world}, buckets {self.buckets}, {self.stats['too_short']} items too "
                             f"short for every bucket at {self.fps} fps): use more data, smaller batches or "
                             f"shorter buckets")
        self._epoch, self._batch = epoch, 0

    def _close(self) -> None:
        self._iter = None  # dropping a DataLoader iterator shuts its workers down

    def _open(self) -> Iterator[dict]:
        ds = self._dataset(self._epoch, self._batch)
        if self.num_workers == 0:
            return map(ds.__getitem__, range(len(ds)))
        # Map-style and in order: batch i is the same whichever worker decodes it, so resume stays exact.
        loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers,
                            worker_init_fn=_init_worker)
        return iter(loader)

    def __iter__(self) -> VideoStream:
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._open()
        batch = next(self._iter)
        self._batch += 1
        if self._batch >= len(self._plan(self._epoch)):
            self.start_epoch(self._epoch + 1)
        tally = batch.pop("skipped"), batch.pop("drawn"), batch.pop("candidates")
        self._account(batch, *tally, batch.pop("no_audio", None))
        return batch

    def _account(self, batch: dict, failed: list[tuple[str, str, str]], drawn: int, candidates: int,
                 silent: list[str] | None) -> None:
        """Count the batch's clips (seen: every clip tried, replacement draws included) and failures; raise when
        nothing could be loaded, or when more than max_skip_fraction of the clips tried so far failed."""
        self.stats["seen"] += len(batch["key"]) + drawn
        if silent is not None:
            self.stats["no_audio"] = self.stats.get("no_audio", 0) + len(silent)
        for shard, key, reason in failed:
            self.stats["skipped"] += 1
            self._skipped = [*self._skipped[-(_KEEP_SKIPPED - 1):], f"{shard}:{key} ({reason})"]
            if batch["video"] is not None:
                how = "a clip drawn from the epoch's others" if drawn else "another clip of the same batch"
                warnings.warn(f"rank {self.rank}: skipping video {key!r} of {self.root / shard}: {reason}; "
                              f"replaced by {how}", RuntimeWarning, stacklevel=3)
        if batch["video"] is None:
            raise RuntimeError(f"rank {self.rank}: every clip of a batch of bucket "
                               f"{_bucket_name(self.buckets[batch['bucket']])} failed to load, "
                               f"{_why_no_draw(drawn, candidates, self.max_skip_fraction)}; the latest: "
                               f"{self._skipped[-min(len(failed), 5):]}")
        seen, skipped = self.stats["seen"], self.stats["skipped"]
        if seen >= MIN_SEEN and skipped / seen > self.max_skip_fraction:
            raise RuntimeError(f"rank {self.rank}: {skipped} of {seen} clips failed to load, more than "
                               f"max_skip_fraction={self.max_skip_fraction}; the latest: {self._skipped}")

    # ---- resume ----

    def _identity(self) -> dict:
        return {"world": self.world, "rank": self.rank, "seed": self.seed, "fps": self.fps,
                "batch_multiple": self.batch_multiple, "buckets": [list(astuple(b)) for b in self.buckets],
                "num_shards": len(self.shards)}

    def state_dict(self) -> dict:
        """Plain-Python cursor (epoch, batch within it) plus counters; the plan itself is recomputed."""
        return {**self._identity(), "format": FORMAT, "epoch": self._epoch, "batch": self._batch,
                "stats": dict(self.stats), "skipped": list(self._skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where state_dict() was taken; world, seed, buckets... must match."""
        mine = self._identity()
        for key in _CHECKED:
            if state.get(key) != mine[key]:
                raise ValueError(f"video data state was saved with {key}={state.get(key)}, this stream has "
                                 f"{mine[key]}: it cannot resume this stream (call start_epoch() instead)")
        self.start_epoch(int(state["epoch"]))
        if not 0 <= state["batch"] < len(self):
            raise ValueError(f"video data state batch {state['batch']} is outside epoch {self._epoch}'s "
                             f"{len(self)} batches")
        self._batch = int(state["batch"])
        self.stats, self._skipped = dict(state["stats"]), list(state["skipped"])
