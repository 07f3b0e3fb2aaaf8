"""LoRA (peft) on 2 ranks over gloo: only adapters in the optimizer, frozen base, exact resume under ZeRO-2 and
ZeRO-3, and the peft export loading onto the hf export with our logits."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint import complete_checkpoints
from framework.export.safetensors_io import consolidated_state_dict
from framework.lora import split_state
from tests.runs import ROOT, losses, train

pytestmark = pytest.mark.dist

LORA = ["lora.rank=4", "lora.alpha=8", "lora.targets=[wq,wv,ffn.w2]"]
RANK, D, FFN, LAYERS = 4, 64, 128, 2  # tests.runs.SMALL's model
ADAPTER_PARAMS = LAYERS * (RANK * (D + D) * 2 + RANK * (FFN + D))  # wq, wv: A 4x64, B 64x4; w2: A 4x128, B 64x4


def _export_cli():
    """launch/export.py as a module (its `_bootstrap` import needs launch/ on the path)."""
    sys.path.insert(0, str(ROOT / "launch"))
    spec = importlib.util.spec_from_file_location("launch_export", ROOT / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exp_avg_numel(obj) -> int:
    if isinstance(obj, dict):
        return sum(v.numel() if k == "exp_avg" and torch.is_tensor(v) else _exp_avg_numel(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_exp_avg_numel(v) for v in obj)
    return 0


def _check_resume_and_adapters(text_data, tmp_path, stage: int, precision: str = "fp32"):
    """4 steps straight == 2 + resume=auto + 2 (losses, weights); base frozen, only adapter moments kept.
    Returns the straight run's last checkpoint."""
    common = [f"train.zero_stage={stage}", f"train.precision={precision}", "train.steps=4", "optim.lr=3e-3",
              "checkpoint.every=2", *LORA]
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = train(text_data, straight, *common, nproc=2)
    assert "LoRA rank 4 (alpha 8) on 6 Linear layers" in out.stdout + out.stderr
    train(text_data, split, *common, "train.stop_after=2", nproc=2)
    train(text_data, split, *common, "resume=auto", nproc=2)

    a, b = losses(straight), losses(split)
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    first, last = (consolidated_state_dict(c) for c in complete_checkpoints(straight / "checkpoints")[-2:])
    wb = consolidated_state_dict(complete_checkpoints(split / "checkpoints")[-1])
    assert last.keys() == wb.keys() and all(torch.equal(last[k], wb[k]) for k in last)

    # Base weights frozen between step 2 and 4, adapters moving; the optimizer holds adapter moments only.
    base2, ad2 = split_state(first)
    base4, ad4 = split_state(last)
    assert sorted(ad4) == [f"blocks.{i}.{m}" for i in range(LAYERS) for m in ("attn.wq", "attn.wv", "ffn.w2")]
    assert all(torch.equal(base2[k], base4[k]) for k in base4)
    assert all(not torch.equal(ad2[k][1], ad4[k][1]) for k in ad4)
    ckpt = complete_checkpoints(straight / "checkpoints")[-1]
    held = sum(_exp_avg_numel(torch.load(f, map_location="cpu", weights_only=False))
               for f in ckpt.glob("*optim_states.pt"))
    assert ADAPTER_PARAMS <= held <= ADAPTER_PARAMS + 64, f"optimizer moments for {held} parameters"
    return ckpt


def test_lora_zero2_bf16_resume_is_exact_and_trains_only_adapters(text_data, tmp_path):
    ckpt = _check_resume_and_adapters(text_data, tmp_path, 2, "bf16")
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    frozen = {v.dtype for k, v in module.items() if ".lora_" not in k}
    assert frozen == {torch.bfloat16}  # the frozen base is held (and saved) in bf16, never as fp32


def test_lora_zero3_resume_and_peft_export_with_our_logits(text_data, tmp_path, capsys):
    """ZeRO-3 resume as above; then PeftModel.from_pretrained(AutoModelForMaskedLM(hf export), peft export)
    gives our LoRA model's logits, and so does the --merge hf export."""
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    import framework  # noqa: F401  (registers the hf classes)
    from framework import lora
    from framework.checkpoint import read_meta
    from framework.nn.llada import LladaModel
    from framework.recipe import load_run_config
    from framework.trained import load_trained

    ckpt = _check_resume_and_adapters(text_data, tmp_path, 3)
    run = ckpt.parent.parent
    export = _export_cli()  # in this process: four CLI runs without four interpreter and DeepSpeed start-ups
    for fmt, flags, name in (("hf", [], "hf"), ("peft", [], "peft"), ("hf", ["--merge"], "merged"),
                             ("safetensors", ["--merge", "--ema"], "ema_merged")):
        assert export.main([str(run), "--format", fmt, "--out", str(tmp_path / name), *flags]) == 0, name
    assert export.main([str(run), "--format", "peft", "--merge", "--out", str(tmp_path / "both")]) == 2
    assert "choose one" in capsys.readouterr().err
    cfg, _ = load_run_config(read_meta(ckpt)["config"], [], world=2)
    # The EMA holds the adapters only (the trainable weights): the export takes the base from the live weights.
    ema_merged = load_file(tmp_path / "ema_merged" / "model.safetensors")
    live_merged = lora.merge(*split_state(consolidated_state_dict(ckpt)), cfg.lora)
    assert ema_merged.keys() == live_merged.keys()
    assert not torch.equal(ema_merged["blocks.0.attn.wq.weight"], live_merged["blocks.0.attn.wq.weight"])
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]

    ours = LladaModel(cfg.model)
    lora.apply(ours, cfg)
    ours.load_state_dict(consolidated_state_dict(ckpt))
    ids = torch.randint(5, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    base = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        plain = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        expected = ours.eval()(ids)
        got = peft_model(ids).logits
        merged = AutoModelForMaskedLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapters changed the model
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # launch/sample.py's loader takes a LoRA run too
        sampled = load_trained(str(run), use_ema=False).model.eval()(ids)
    torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
