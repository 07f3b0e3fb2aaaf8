"""Cached VAE latents: writing latent shards and streaming them back, resumable like the other streams.

A latent shard holds `KEY.latent.npy` (float16 (C, T, H, W)), `KEY.txt` and `KEY.json` (captions);
`index.json` records per-item tar offsets, the cache key (which VAE, resolution, frames and fps made it)
and latent statistics, so a cache made with another VAE or resolution is never used by mistake.
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


class LatentStream:
    """Batches {"latents": (B, C, T, H, W) float32, "caption": [str]}; the same count on every rank."""

    def __init__(self, data_dir: str | Path, batch_size: int, rank: int, world: int, seed: int,
                 batch_multiple: int = 1):
        self.index = load_index(data_dir)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{data_dir}: not a latent cache (format {self.index.get('format')!r})")
        self.root = Path(self.index["root"])
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
        latents, captions = [], []
        for shard, item in self._plan[self._batch * b: (self._batch + 1) * b]:
            path = self.root / self.index["shards"][shard]["path"]
            latents.append(np.load(io.BytesIO(read_member(path, item["latent.npy"])), allow_pickle=False))
            meta = json.loads(read_member(path, item["json"]))
            caps = meta["captions"]
            captions.append(caps[(self._epoch + self.seed) % len(caps)])
        self._batch += 1
        if self._batch >= self.batches_per_epoch:
            self.start_epoch(self._epoch + 1)
        return {"latents": torch.from_numpy(np.stack(latents).astype(np.float32)), "caption": captions}

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch, "world": self.world, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world or state["seed"] != self.seed:
            raise ValueError(f"latent stream state has world {state['world']} / seed {state['seed']}, this stream "
                             f"{self.world} / {self.seed}")
        self.start_epoch(int(state["epoch"]))
        self._batch = int(state["batch"])
