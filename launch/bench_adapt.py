"""AR -> masked diffusion adaptation on the tiny tasks, against a masked model trained from scratch.

    python launch/bench_adapt.py --ar-steps S --adapt-steps S2 [--anneal-steps A] [--work DIR] [key=value ...]
    (also `python launch/benchmark.py adapt ...`)

Three runs of launch/train.py on the fixed-width tasks (data/make_tasks.py, generated into the work folder when
--data is not given), one process each:
  ar       recipes/llada/configs/tasks_tiny_ar.yaml for S steps (the AR twin: causal, next-token loss);
  adapted  recipes/llada/configs/tasks_tiny.yaml for S2 steps with train.init_from=the AR run, model.causal=false,
           objective.shift=true (Dream) and objective.anneal_steps=A (DiffuLLaMA);
  scratch  recipes/llada/configs/tasks_tiny.yaml for S + S2 steps from random weights (the same compute).
--ablation adds a fourth run: the same adaptation with neither shift nor annealing.
Each ends with the recipe's own evaluation (eval.at_end): the held-out ELBO (AR: exact NLL) in bits per answer
token and the exact match of decoded held-out prompts. Prints one markdown row per run (and JSON with --json).
Extra key=value overrides go to every run (e.g. eval.samples=200 eval.batches=13).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "llada" / "configs"
QUIET = ["log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.at_end=true", "checkpoint.every=0",
         "checkpoint.at_end=true", "sample.prompts=[]"]


def adapt_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ar-steps", type=int, default=600, help="S: steps of the AR twin")
    p.add_argument("--adapt-steps", type=int, default=600, help="S': steps of the adaptation")
    p.add_argument("--anneal-steps", type=int, default=200, help="objective.anneal_steps of the adaptation")
    p.add_argument("--no-shift", action="store_true", help="adapt without objective.shift")
    p.add_argument("--ablation", action="store_true", help="also adapt with neither shift nor annealing")
    p.add_argument("--data", default="", help="a data/make_tasks.py folder (default: generated into --work)")
    p.add_argument("--work", default="runs/bench_adapt", help="folder for the data and the three runs")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return p


def make_data(work: Path) -> Path:
    """The fixed-width tasks the tiny presets train on, generated once into work/tasks_fixed."""
    out = work / "tasks_fixed"
    if not (out / "train" / "index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "data" / "make_tasks.py"), "--out", str(out), "--min-items", "5",
                        "--max-items", "5", "--fixed-width"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def train(preset: str, run_dir: Path, overrides: list[str]) -> float:
    """One launch/train.py run (fresh: its folder is replaced); wall seconds."""
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), str(CONFIGS / preset), f"run_dir={run_dir}", *QUIET,
           *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_adapt: {preset} ({run_dir}) failed with exit code {done.returncode}:\n"
                 f"{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - start


def final_eval(run_dir: Path) -> dict:
    """The last evaluation's metrics of a run (its metrics.jsonl rows with eval/ keys)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evals:
        sys.exit(f"bench_adapt: {run_dir}/metrics.jsonl has no evaluation")
    return {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")}


def row(name: str, steps: str, seconds: float, metrics: dict) -> dict:
    bits = metrics.get("elbo_bits_per_token", metrics.get("nll_bits_per_token"))
    kind = "ELBO" if "elbo_bits_per_token" in metrics else "NLL"
    return {"run": name, "steps": steps, "exact_match": metrics.get("exact_match"), "bits_per_token": bits,
            "bound": kind, "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| run | steps | exact match | bits/answer token | train + eval s |", "|---|---|---|---|---|"]
    for r in rows:
        em = "-" if r["exact_match"] is None else f"{100 * r['exact_match']:.1f}%"
        lines.append(f"| {r['run']} | {r['steps']} | {em} | {r['bits_per_token']:.3f} ({r['bound']}) | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def run_adapt(args: argparse.Namespace) -> list[dict]:
    work = (ROOT / args.work).resolve() if not Path(args.work).is_absolute() else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else make_data(work)
    s, s2 = args.ar_steps, args.adapt_steps
    common = [f"data.dir={data}", *args.overrides]
    adapt = [f"train.init_from={work / 'ar'}", "model.causal=false", f"objective.anneal_steps={args.anneal_steps}",
             f"objective.shift={'false' if args.no_shift else 'true'}"]
    shift = "no shift" if args.no_shift else "shift"
    rows = []
    t = train("tasks_tiny_ar.yaml", work / "ar", [f"train.steps={s}", *common])
    rows.append(row("AR twin", str(s), t, final_eval(work / "ar")))
    t = train("tasks_tiny.yaml", work / "adapted", [f"train.steps={s2}", *adapt, *common])
    rows.append(row(f"AR -> masked ({shift}, anneal {args.anneal_steps})", f"{s} + {s2}", t,
                    final_eval(work / "adapted")))
    if args.ablation:
        plain = [f"train.init_from={work / 'ar'}", "model.causal=false"]
        t = train("tasks_tiny.yaml", work / "adapted_plain", [f"train.steps={s2}", *plain, *common])
        rows.append(row("AR -> masked (no shift, no anneal)", f"{s} + {s2}", t, final_eval(work / "adapted_plain")))
    t = train("tasks_tiny.yaml", work / "scratch", [f"train.steps={s + s2}", *common])
    rows.append(row("masked from scratch", str(s + s2), t, final_eval(work / "scratch")))
    return rows


def report(args: argparse.Namespace) -> None:
    """Run the three trainings and print the table (launch/benchmark.py adapt calls this too)."""
    rows = run_adapt(args)
    print(table(rows))
    if args.json:
        print(json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    report(adapt_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
