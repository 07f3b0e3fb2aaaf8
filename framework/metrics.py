"""Progress bar, metrics.jsonl and wandb on rank 0; throughput and MFU."""

from __future__ import annotations

import json
import time
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


class Logger:
    """Writes one JSON line per logged step, mirrors it to wandb and shows a progress bar (rank 0)."""

    def __init__(self, run_dir: str, config: dict, *, main: bool, total_steps: int, start_step: int,
                 wandb_mode: str, project: str, progress: bool):
        self.main = main
        self.bar = None
        self.wandb = None
        if not main:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
        if wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=project, dir=run_dir, config=config, mode=wandb_mode,
                                    name=Path(run_dir).name, resume="allow")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.main:
            return
        row = {"step": step, "time": time.time(), **values}
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
