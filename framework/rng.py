"""Random state: per-(seed, step, rank, micro-step) generators and whole-process RNG snapshots."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer keys (SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, step: int, rank: int, micro: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator every random draw of an objective comes from at one micro-step of one rank."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, step, rank, micro))
    return gen


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (model initialisation, dropout) identically on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """Global RNG states as plain types and tensors (loadable with weights_only=True)."""
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "torch": torch.get_rng_state(),
    }
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = int(np_state[2])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
