"""Cached VAE latents: writing latent shards and streaming them back, resumable like the other streams.

A latent shard holds `KEY.latent.npy` (float16 (C, T, H, W)), `KEY.txt` and `KEY.json` (captions);
`index.json` records per-item tar offsets, the cache key (which VAE, resolution, frames and fps made it)
and latent statistics, so a cache made with another VAE or resolution is never used by mistake.

Caption embeddings of a frozen text encoder live in a sidecar, `SPLIT/text/`, so they can be added to or
rebuilt for an existing latent cache without running the VAE again: one tar per latent shard (same name) of
`KEY.cI.npy`, caption I's states trimmed to its tokens (L, D) in the encoder's compute dtype (bf16 stored as
its int16 bit pattern: numpy has no bf16), `null.npy` (the states of ""), and `index.json` with the text key
(encoder digest, max length, dtype) and each item's spans. The stream pads states back to max_len with zeros,
which is what the encoder gives past a caption's tokens.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from framework.data.shards import assign_shards, load_index
from framework.export import diffusers_wan

FORMAT = "latents-v1"
TEXT_FORMAT = "text-embeddings-v1"


def vae_digest(vae_path: str | Path) -> str:
    """A VAE folder's identity: sha256 of our export's model.safetensors (what it always was, so older caches
    stay valid), or of a diffusers folder's config.json (without `_`-prefixed bookkeeping such as
    `_diffusers_version`; it holds the latent normalisation) and the weight files it loads."""
    folder = Path(vae_path)
    if (folder / "model.safetensors").is_file():
        return _sha256([folder / "model.safetensors"])
    config = json.loads((folder / "config.json").read_text())
    settings = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    return _sha256(diffusers_wan.weight_files(folder), h)


def _sha256(files: list[Path], h=None) -> str:
    """First 16 hex digits of sha256 over the files' bytes, read in 16 MiB blocks (VAE weights reach GBs)."""
    h = h or hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:16]


def cache_key(vae_path: str, bucket: str, fps: float) -> dict:
    """What a cache depends on: the VAE (vae_digest), the bucket's size and frames, the sampling rate."""
    return {"vae_sha256": vae_digest(vae_path), "bucket": bucket.split(":")[0], "fps": float(fps)}


def write_latent_shard(path: Path, samples: list[tuple[str, np.ndarray, list[str]]]) -> dict:
    """samples: (key, latent (C, T, H, W), captions) -> a tar; returns its index entry."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for key, latent, captions in samples:
            buf = io.BytesIO()
            np.save(buf, latent.astype(np.float16), allow_pickle=False)
            sink.write({"__key__": key, "latent.npy": buf.getvalue(), "txt": captions[0],
                        "json": json.dumps({"captions": captions}).encode()})
    items = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            items.setdefault(key, {"key": key})[ext] = [member.offset_data, member.size]
    return {"path": path.name, "samples": len(samples), "items": list(items.values())}


def read_member(path: Path, span: list[int]) -> bytes:
    with open(path, "rb") as f:
        f.seek(span[0])
        return f.read(span[1])


# ---- caption embeddings (the text sidecar) ------------------------------------------------------------------
def to_numpy(states: torch.Tensor) -> np.ndarray:
    """A float32 or bf16 tensor as a numpy array np.save can write (bf16 as its int16 bit pattern)."""
    states = states.detach().cpu().contiguous()
    return (states.view(torch.int16) if states.dtype == torch.bfloat16 else states.float()).numpy()


def from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_text_shard(path: Path, samples: list[tuple[str, list[torch.Tensor]]]) -> dict:
    """samples: (key, [states (L_i, D) of each caption]) -> a tar of KEY.cI.npy; returns its index entry
    {"path", "items": {key: [[offset, size] of each caption]}}."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for key, states in samples:
            sink.write({"__key__": key, **{f"c{i}.npy": npy_bytes(to_numpy(s)) for i, s in enumerate(states)}})
    items: dict[str, dict[int, list[int]]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            items.setdefault(key, {})[int(ext[1:-4])] = [member.offset_data, member.size]
    return {"path": path.name, "items": {k: [v[i] for i in sorted(v)] for k, v in items.items()}}


def text_index_path(split_dir: str | Path) -> Path:
    return Path(split_dir) / "text" / "index.json"


def read_text_index(split_dir: str | Path) -> dict | None:
    """SPLIT/text/index.json of a latent cache, or None when it has no caption embeddings."""
    path = text_index_path(split_dir)
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    if index.get("format") != TEXT_FORMAT:
        raise ValueError(f"{path}: not a text-embedding index (format {index.get('format')!r})")
    return index


class CaptionEmbeddings:
    """Cached caption states of one split: `states(latent_shard_path, key, i)` -> (max_len, D), mask (max_len)."""

    def __init__(self, split_dir: str | Path, index: dict, latent_shards: list[dict]):
        self.dir = Path(split_dir) / "text"
        self.max_len, self.dtype = int(index["text_key"]["max_len"]), index["text_key"]["dtype"]
        self.shards = index["shards"]
        for shard in latent_shards:  # every cached clip must have its captions, or training would need the encoder
            entry = self.shards.get(shard["path"], {"items": {}})
            missing = [item["key"] for item in shard["items"] if item["key"] not in entry["items"]]
            if missing:
                raise ValueError(f"{self.dir}: no caption embeddings for {shard['path']}:{missing[0]} "
                                 f"({len(missing)} clips of that shard)")
        self.null = self.padded(from_numpy(np.load(self.dir / index["null"], allow_pickle=False), self.dtype))

    def count(self, shard_path: str, key: str) -> int:
        return len(self.shards[shard_path]["items"][key])

    def states(self, shard_path: str, key: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.shards[shard_path]
        data = read_member(self.dir / entry["path"], entry["items"][key][i])
        return self.padded(from_numpy(np.load(io.BytesIO(data), allow_pickle=False), self.dtype))

    def padded(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, D) -> (max_len, D) with zeros after the caption's tokens, and the mask of those tokens."""
        out = states.new_zeros(self.max_len, states.shape[1])
        out[: len(states)] = states
        mask = torch.zeros(self.max_len, dtype=torch.bool)
        mask[: len(states)] = True
        return out, mask


def caption_choice(epoch: int, seed: int, count: int) -> int:
    """Which of a clip's `count` captions an epoch trains on: a pure function of (epoch, seed), so resume
    picks the same one (and its cached embedding)."""
    return (epoch + seed) % count


class LatentStream:
    """Batches {"latents": (B, C, T, H, W) float32, "caption": [str]}; the same count on every rank.

    With `text=True` (a frozen encoder's caption embeddings in SPLIT/text/) also "text" (B, max_len, D) and
    "text_mask" (B, max_len) of the chosen captions, and the null caption's "null_text" (1, max_len, D) and
    "null_mask" (1, max_len)."""

    def __init__(self, data_dir: str | Path, batch_size: int, rank: int, world: int, seed: int,
                 batch_multiple: int = 1, text: bool = False):
        self.index = load_index(data_dir)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{data_dir}: not a latent cache (format {self.index.get('format')!r})")
        self.root = Path(self.index["root"])
        self.text = None
        if text:
            text_index = read_text_index(data_dir)
            if text_index is None:
                raise ValueError(f"{data_dir}: no caption embeddings ({text_index_path(data_dir)})")
            self.text = CaptionEmbeddings(data_dir, text_index, self.index["shards"])
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.batch_multiple = batch_multiple
        shards = self.index["shards"]
        counts = []
        for r in range(world):
            n = sum(shards[i]["samples"] for i in assign_shards(len(shards), r, world, seed, 0))
            counts.append(n // batch_size)
        # Shard assignment reshuffles per epoch, so use the smallest share any rank can get in any epoch.
        sizes = sorted(s["samples"] for s in shards)
        worst = sum(sizes[: len(shards) // world]) // batch_size
        self.batches_per_epoch = (min(worst, *counts) // batch_multiple) * batch_multiple
        if self.batches_per_epoch == 0:
            raise ValueError(f"{data_dir}: too few cached latents for batch {batch_size} on {world} ranks")
        self.start_epoch(0)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def start_epoch(self, epoch: int) -> None:
        """Jump to the beginning of `epoch` (also used when the world size changed on resume)."""
        self._epoch, self._batch = epoch, 0
        shards = self.index["shards"]
        plan = [(s, item) for s in assign_shards(len(shards), self.rank, self.world, self.seed, epoch)
                for item in shards[s]["items"]]
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(plan))
        self._plan = [plan[i] for i in order]

    def __iter__(self) -> LatentStream:
        return self

    def __next__(self) -> dict:
        b = self.batch_size
        latents, captions, texts = [], [], []
        for shard, item in self._plan[self._batch * b: (self._batch + 1) * b]:
            name = self.index["shards"][shard]["path"]
            path = self.root / name
            latents.append(np.load(io.BytesIO(read_member(path, item["latent.npy"])), allow_pickle=False))
            meta = json.loads(read_member(path, item["json"]))
            caps = meta["captions"]
            choice = caption_choice(self._epoch, self.seed, len(caps))
            captions.append(caps[choice])
            if self.text is not None:
                if self.text.count(name, item["key"]) != len(caps):
                    raise ValueError(f"{self.text.dir}: {name}:{item['key']} has {len(caps)} captions but "
                                     f"{self.text.count(name, item['key'])} cached embeddings")
                texts.append(self.text.states(name, item["key"], choice))
        self._batch += 1
        if self._batch >= self.batches_per_epoch:
            self.start_epoch(self._epoch + 1)
        batch = {"latents": torch.from_numpy(np.stack(latents).astype(np.float32)), "caption": captions}
        if self.text is not None:
            null, null_mask = self.text.null
            batch.update(text=torch.stack([t for t, _ in texts]), text_mask=torch.stack([m for _, m in texts]),
                         null_text=null[None], null_mask=null_mask[None])
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch, "world": self.world, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world or state["seed"] != self.seed:
            raise ValueError(f"latent stream state has world {state['world']} / seed {state['seed']}, this stream "
                             f"{self.world} / {self.seed}")
        self.start_epoch(int(state["epoch"]))
        self._batch = int(state["batch"])
