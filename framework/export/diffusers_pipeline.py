"""A diffusers pipeline folder (Wan2.1's released `*-Diffusers` layout) -> the parts a run takes from it.

Layout: `model_index.json` at the top, then one folder per component: `transformer/` (WanTransformer3DModel),
`vae/` (AutoencoderKLWan), `text_encoder/` (UMT5EncoderModel) with its `tokenizer/`, and `scheduler/`
(`scheduler_config.json`). The scheduler carries the flow shift the model was trained and is sampled with:
`shift` of FlowMatchEulerDiscreteScheduler, or `flow_shift` of UniPCMultistepScheduler with `use_flow_sigmas`
(what Wan ships), plus `num_train_timesteps`. Only config files are read here; weights are loaded elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from framework.config import ConfigError

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")
# FlowMatchEulerDiscreteScheduler options that move its sigmas off shift_t's grid; our sampler does not mirror them.
_UNSUPPORTED_EULER = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                      "invert_sigmas", "shift_terminal", "stochastic_sampling")


@dataclass(frozen=True)
class FlowSchedule:
    """The source scheduler's flow schedule: its class, shift and number of training timesteps."""

    scheduler: str
    shift: float
    num_train_timesteps: int


def is_pipeline_folder(path: str | Path) -> bool:
    """A folder with a model_index.json (a diffusers pipeline), whatever its components."""
    return bool(path) and (Path(path) / MODEL_INDEX).is_file()


def component(root: str | Path, name: str) -> str:
    """root/name, which must be a folder with files in it (ConfigError naming the path otherwise)."""
    path = Path(root) / name
    if not path.is_dir() or not any(path.iterdir()):
        raise ConfigError(f"train.init_from: {Path(root) / MODEL_INDEX} is a diffusers pipeline without a "
                          f"'{name}/' folder ({path} is missing or empty)")
    return str(path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.init_from: {path} is missing") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.init_from: {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.init_from: {path} is not a JSON object")
    return data


def flow_schedule(root: str | Path) -> FlowSchedule:
    """The flow shift and training timesteps of root/scheduler/scheduler_config.json (ConfigError naming the file
    for a scheduler that is not a flow scheduler we can follow)."""
    path = Path(component(root, "scheduler")) / SCHEDULER_CONFIG
    config = _read_json(path)
    name = config.get("_class_name")
    if name == "FlowMatchEulerDiscreteScheduler":
        on = [k for k in _UNSUPPORTED_EULER if config.get(k)]
        if on:
            raise ConfigError(f"train.init_from: {path}: {', '.join(on)} is set; only the plain shifted grid "
                              f"(shift, num_train_timesteps) is supported")
        shift = config.get("shift", 1.0)
    elif name == "UniPCMultistepScheduler":
        if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
            raise ConfigError(f"train.init_from: {path}: UniPCMultistepScheduler without use_flow_sigmas=true and "
                              f"prediction_type=flow_prediction is no flow-matching schedule")
        if config.get("use_dynamic_shifting"):
            raise ConfigError(f"train.init_from: {path}: use_dynamic_shifting is set; only a fixed flow_shift "
                              f"is supported")
        shift = config.get("flow_shift", 1.0)
    else:
        raise ConfigError(f"train.init_from: {path}: scheduler class {name!r} is not one of "
                          f"{', '.join(FLOW_SCHEDULERS)}")
    steps = config.get("num_train_timesteps", 1000)
    if not isinstance(shift, (int, float)) or shift <= 0 or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"train.init_from: {path}: shift {shift!r} / num_train_timesteps {steps!r} out of range")
    return FlowSchedule(name, float(shift), steps)


# ---- writing a whole pipeline folder (launch/export.py --format diffusers --pipeline) ---------------------------
TRANSFORMER = "transformer"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file WanPipeline.load_lora_weights(folder) reads
_SHIFT_KEY = {"FlowMatchEulerDiscreteScheduler": "shift", "UniPCMultistepScheduler": "flow_shift"}


def export_source(init_from: str) -> Path:
    """The pipeline folder a run was initialised from (train.init_from), which --pipeline copies the frozen parts
    of; ConfigError naming the key when the run did not start from one or the folder is gone."""
    if not init_from:
        raise ConfigError("--pipeline: this run has no train.init_from; the pipeline's vae, text encoder, tokenizer "
                          "and scheduler are copied from the diffusers pipeline folder it was initialised from")
    if not is_pipeline_folder(init_from):
        raise ConfigError(f"--pipeline: train.init_from={init_from} is not a diffusers pipeline folder "
                          f"(no {MODEL_INDEX} there); export the transformer alone without --pipeline")
    return Path(init_from)


def pipeline_components(root: str | Path) -> list[str]:
    """Names of the components model_index.json lists as present ([library, class], not [null, null])."""
    index = _read_json(Path(root) / MODEL_INDEX)
    return sorted(k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] and v[1])


def write_scheduler(src: Path, dst: Path, shift: float, num_train_timesteps: int) -> None:
    """The source scheduler config with the run's flow shift and training timesteps (the schedule it trained
    and samples on; the folder's own unless the run set diffusion.shift / num_train_timesteps)."""
    config = _read_json(src / SCHEDULER_CONFIG)
    key = _SHIFT_KEY.get(config.get("_class_name"))
    if key is not None and shift:
        config[key] = shift
    if num_train_timesteps:
        config["num_train_timesteps"] = num_train_timesteps
    dst.mkdir(parents=True, exist_ok=True)
    (dst / SCHEDULER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_frozen_parts(root: str | Path, out_dir: str | Path, shift: float, num_train_timesteps: int) -> list[str]:
    """Copy model_index.json and every component but transformer/ from the source pipeline root into out_dir (the
    exporter writes transformer/ itself): the frozen VAE, text encoder, tokenizer as trained with, the scheduler
    at the run's shift. Returns the written top-level names."""
    import shutil

    root, out = Path(root), Path(out_dir)
    if out.resolve() == root.resolve():
        raise ConfigError(f"--out {out_dir} is the source pipeline folder itself; choose a new folder")
    names = [n for n in pipeline_components(root) if n != TRANSFORMER]
    for name in names:
        component(root, name)  # a listed component that is missing is named before anything is copied
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "scheduler":
            write_scheduler(root / name, out / name, shift, num_train_timesteps)
        else:
            shutil.copytree(root / name, out / name, dirs_exist_ok=True)
    shutil.copyfile(root / MODEL_INDEX, out / MODEL_INDEX)
    return [MODEL_INDEX, *names]
