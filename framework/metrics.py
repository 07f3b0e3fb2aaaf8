"""Progress bar, metrics.jsonl and wandb on rank 0; throughput and MFU."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak per device in TFLOP/s (no sparsity), for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(configured: float) -> float:
    """Configured peak, else a table lookup by GPU name; 0 where unknown (no MFU is reported)."""
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def mfu(flops_per_second: float, peak: float, world: int) -> float:
    """Model FLOPs utilisation of the whole job: achieved / (peak x devices)."""
    return flops_per_second / (peak * 1e12 * world) if peak > 0 else 0.0


def resolve_wandb_mode(configured: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """`log.wandb` when the config sets it, else the WANDB_MODE environment variable, else offline."""
    return configured or environ.get("WANDB_MODE") or "offline"


def keep_records(path: Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite a JSONL file with only the records `keep` accepts (streamed, then swapped in atomically); returns
    how many were dropped. A line that is not JSON (a write cut short by a crash) is dropped too."""
    if not path.exists():
        return 0
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    dropped = 0
    with open(path) as src, open(tmp, "w") as dst:
        for line in src:
            try:
                ok = keep(json.loads(line))
            except (ValueError, TypeError, KeyError):  # not JSON, not a record, or no comparable step
                ok = False
            if ok:
                dst.write(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return dropped


def _metric_keys(row: dict) -> frozenset:
    return frozenset(row) - {"step", "time"}


class Logger:
    """Writes one JSON line per logged step, mirrors it to wandb and shows a progress bar (rank 0).

    A run that resumes at step S abandons whatever the previous timeline logged after S (it ran past its last
    checkpoint, or an older checkpoint was resumed): those records are dropped when the file is opened, and a
    record at S itself that is logged again (the final evaluation of a finished run) replaces the old one, so
    every step appears once in metrics.jsonl."""

    def __init__(self, run_dir: str, config: dict, *, main: bool, total_steps: int, start_step: int,
                 wandb_mode: str | None, project: str, progress: bool):
        self.main = main
        self.bar = None
        self.wandb = None
        self.start_step = start_step
        if not main:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / "metrics.jsonl"
        keep_records(self.path, lambda row: row["step"] <= start_step)
        self.jsonl = open(self.path, "a")
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=project, dir=run_dir, config=config, mode=mode,
                                    name=Path(run_dir).name, resume="allow")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.main:
            return
        row = {"step": step, "time": time.time(), **values}
        if step <= self.start_step:  # logged before the resume: replace that record, never repeat it
            self.jsonl.close()
            keys = _metric_keys(row)
            keep_records(self.path, lambda old: old["step"] != step or _metric_keys(old) != keys)
            self.jsonl = open(self.path, "a")
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.bar is not None:
            shown = {k: v for k, v in values.items() if k in ("loss", "lr") or k.endswith("_per_s")}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def log_media(self, step: int, folder: str | Path) -> None:
        """Send the sample files an evaluation wrote (mp4, png, txt) to wandb (rank 0; the files stay on disk)."""
        if self.wandb is None or not Path(folder).is_dir():
            return
        import wandb

        media = {}
        for path in sorted(Path(folder).iterdir()):
            if path.suffix == ".mp4":
                media[f"samples/{path.stem}"] = wandb.Video(str(path), format="mp4")
            elif path.suffix == ".png":
                media[f"samples/{path.stem}"] = wandb.Image(str(path))
            elif path.suffix == ".txt":
                media[f"samples/{path.stem}"] = wandb.Html(f"<pre>{path.read_text()}</pre>")
        if media:
            self.wandb.log(media, step=step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        """Print above the progress bar (rank 0)."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
