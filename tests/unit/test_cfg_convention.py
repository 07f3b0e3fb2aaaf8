"""One CFG convention in every recipe: guided = uncond + s (cond - uncond), s = 1 off, s = 0 unconditional.

Each recipe is checked through its own sampling path (LLaDA: `generate_answers`, the decoder behind its
sample and evaluate hooks; the DiTs: `sample_latents`, what their `generate` decodes) with tiny real models:
s = 1 must give exactly the conditional output and s = 0 exactly the unconditional one. Renamed config keys
(`time_scale`) must still load from configs saved before the rename.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from framework.config import ConfigError, to_dict
from framework.recipe import load_run_config
from recipes.llada.decoding import generate_answers

# ------------------------------------------------------------------------------------------
# LLaDA: decoding with sample.cfg_scale = s equals LLaDA's own generate.py at cfg_scale w = s - 1

LLADA = "recipes/llada/configs/tasks_tiny.yaml"
LLADA_SMALL = ["model.vocab_size=40", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_hidden=64",
               "model.max_seq_len=64", "model.init_std=0.3", "sample.gen_length=8", "sample.block_length=4",
               "sample.steps=8", "sample.threshold=0", "sample.cache=none", "sample.refresh_every=0"]
PROMPTS = [[7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [20, 9, 31, 5, 17]]
NEVER = 1000  # an EOS id the model cannot emit: every answer runs to gen_length, as in generate.py


def llada_generate(model, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, mask_id: int,
                   cfg_scale: float = 0.0) -> torch.Tensor:
    """Transcription of LLaDA's generate.py (temperature 0, low_confidence remasking) with its CFG,
    un_logits + (cfg_scale + 1) (logits - un_logits), as the oracle. Two deviations: the mask token is never
    a prediction, as in our decoder (generate.py may commit it and leave the position masked), and CFG runs
    for any cfg_scale != 0 (generate.py: > 0), so cfg_scale = -1 gives the unconditional logits exactly."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        mask_num = (x[:, lo: lo + block_length] == mask_id).sum(dim=1, keepdim=True)
        transfer = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
        for i in range(mask_num.size(0)):
            transfer[i, : mask_num[i] % steps] += 1
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale != 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x], dim=0))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            logits[..., mask_id] = -math.inf
            x0 = torch.argmax(logits, dim=-1)
            x0_p = torch.gather(F.softmax(logits, dim=-1), dim=-1, index=x0[..., None]).squeeze(-1)
            x0_p[:, lo + block_length:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = torch.topk(confidence[j], k=int(transfer[j, i]))
                transfer_index[j, select] = True
            x[transfer_index] = x0[transfer_index]
    return x[:, prompt.shape[1]:]


def llada(cfg_scale: float):
    cfg, recipe = load_run_config(LLADA, [*LLADA_SMALL, f"sample.cfg_scale={cfg_scale}"], world=1)
    torch.manual_seed(0)
    return cfg, recipe.build_model(cfg).model.eval()


def recipe_answers(cfg_scale: float) -> torch.Tensor:
    cfg, model = llada(cfg_scale)
    answers, _ = generate_answers(model, cfg, PROMPTS, eos_id=NEVER, pad_id=0, device=torch.device("cpu"))
    return torch.tensor(answers)


def oracle(w: float) -> torch.Tensor:
    cfg, model = llada(1.0)
    s = cfg.sample
    with torch.no_grad():
        return llada_generate(model, torch.tensor(PROMPTS), s.steps, s.gen_length, s.block_length, cfg.model.mask_id, w)


def test_llada_scale_one_is_the_conditional_answer():
    assert torch.equal(recipe_answers(1.0), oracle(0.0))  # generate.py without CFG


def test_llada_scale_zero_is_the_answer_without_the_prompt():
    unconditional = oracle(-1.0)  # decoded from the logits of the prompt masked out alone
    assert not torch.equal(unconditional, oracle(0.0))  # the prompt matters to this model
    assert torch.equal(recipe_answers(0.0), unconditional)


def test_llada_published_cfg_w_is_our_w_plus_one():
    assert not torch.equal(oracle(1.5), oracle(0.0))  # guidance changes the answers
    assert torch.equal(recipe_answers(2.5), oracle(1.5))


# ------------------------------------------------------------------------------------------
# The DiTs: at s = 1 the null caption plays no part; at s = 0 the prompt plays none

VIDEO_DIT = "recipes/video_dit/configs/tiny.yaml"
VIDEO_DIT_SMALL = ["model.in_channels=4", "model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64",
                   "model.text_dim=32", "text.layers=1", "text.heads=2", "data.buckets=['16x32x5:1']",
                   "train.micro_batch=1", "train.global_batch=1", "sample.steps=3", "vae.scale=1.0",
                   # not the preset's exports/vae_tiny: a local export there (16 channels) would override in_channels
                   "vae.path=tests/no_such_vae_export"]
JOINT = "recipes/video_audio/configs/tiny.yaml"
JOINT_SMALL = ["model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64", "model.text_dim=32",
               "text.layers=1", "text.heads=2", "data.buckets=['32x32x9:1']", "train.micro_batch=1",
               "train.global_batch=1", "sample.steps=3"]
A, B = "a red circle flashes once", "a tan square flashes once"  # equal lengths: the same caption padding


def woken(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere: the zero-initialised heads and gates would make every branch equal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def dit(preset: str, small: list[str], *scales: str):
    cfg, recipe = load_run_config(preset, [*small, *scales], world=1)
    torch.manual_seed(0)
    return cfg, recipe, woken(recipe.build_model(cfg).model)


def video_latents(cfg, recipe, model, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return recipe.sample_latents(cfg, model, {}, [prompt], seed=3)


def joint_latents(cfg, recipe, model, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([z.flatten() for z in recipe.sample_latents(cfg, model, [prompt], seed=3)])


def other_null_caption(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.null_text.add_(1.0)


@pytest.mark.parametrize("objective", [[], ["diffusion.objective=gaussian", "sample.sampler=ddim"]],
                         ids=["flow", "gaussian"])
def test_video_dit_scale_one_is_conditional_and_zero_unconditional(objective):
    cfg, recipe, model = dit(VIDEO_DIT, VIDEO_DIT_SMALL + objective, "sample.cfg_scale=1")
    off = video_latents(cfg, recipe, model, A)
    assert not torch.equal(off, video_latents(cfg, recipe, model, B))  # the caption matters
    cfg0, _, _ = dit(VIDEO_DIT, VIDEO_DIT_SMALL + objective, "sample.cfg_scale=0")
    uncond = video_latents(cfg0, recipe, model, A)
    assert torch.equal(uncond, video_latents(cfg0, recipe, model, B))  # no trace of the caption at s = 0
    other_null_caption(model)
    assert torch.equal(off, video_latents(cfg, recipe, model, A))  # no trace of the null caption at s = 1
    assert not torch.equal(uncond, video_latents(cfg0, recipe, model, A))


def test_joint_scale_one_is_conditional_and_zero_unconditional():
    cfg, recipe, model = dit(JOINT, JOINT_SMALL, "sample.cfg_scale=1", "sample.audio_cfg_scale=1")
    off = joint_latents(cfg, recipe, model, A)
    assert not torch.equal(off, joint_latents(cfg, recipe, model, B))
    cfg0, _, _ = dit(JOINT, JOINT_SMALL, "sample.cfg_scale=0", "sample.audio_cfg_scale=0")
    uncond = joint_latents(cfg0, recipe, model, A)
    assert torch.equal(uncond, joint_latents(cfg0, recipe, model, B))
    other_null_caption(model)
    assert torch.equal(off, joint_latents(cfg, recipe, model, A))
    assert not torch.equal(uncond, joint_latents(cfg0, recipe, model, A))


def test_joint_cross_scale_zero_is_the_output_without_the_bridge():
    """The joint recipe's second condition (the other modality) follows the same convention: at
    cross_cfg_scale 0 the cross-modal weights leave no trace; at 1 (off) the bridged model alone runs."""
    scales = ["sample.cfg_scale=1", "sample.audio_cfg_scale=1"]
    cfg, recipe, model = dit(JOINT, JOINT_SMALL, *scales, "sample.cross_cfg_scale=[1.0,1.0]")
    cut, _, _ = dit(JOINT, JOINT_SMALL, *scales, "sample.cross_cfg_scale=[0.0,0.0]")
    with_bridge, without = joint_latents(cfg, recipe, model, A), joint_latents(cut, recipe, model, A)
    for block in model.dit.blocks:
        for cross in (block.audio_to_video, block.video_to_audio):
            cross.attn.out.weight.data.mul_(2.0)
    assert not torch.equal(joint_latents(cfg, recipe, model, A), with_bridge)
    assert torch.equal(joint_latents(cut, recipe, model, A), without)


# ------------------------------------------------------------------------------------------
# time_scale: one name had two meanings; configs saved with it still load


@pytest.mark.parametrize("preset, new", [(VIDEO_DIT, "timestep_scale"), (JOINT, "rope_positions_per_second")])
def test_a_config_saved_with_time_scale_loads_it_under_its_new_name(preset, new, capsys):
    cfg, _ = load_run_config(preset, [], world=1)
    saved = to_dict(cfg)  # what a checkpoint's meta.json or an export's config.json holds
    saved["model"]["time_scale"] = 12.5
    del saved["model"][new]
    assert getattr(load_run_config(saved, [], world=1)[0].model, new) == 12.5
    assert f"'model.time_scale' is now 'model.{new}'" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=f"give only 'model.{new}'"):
        load_run_config(saved, [f"model.{new}=3"], world=1)


def test_llada_scale_zero_warns_that_it_ignores_the_prompt(capsys):
    """Configs saved before the shared convention used sample.cfg_scale=0 for "off": say what 0 does now."""
    load_run_config(LLADA, [*LLADA_SMALL, "sample.cfg_scale=0"], world=1)
    assert "sample.cfg_scale=0 decodes unconditionally" in capsys.readouterr().out
    load_run_config(LLADA, [*LLADA_SMALL, "sample.cfg_scale=1"], world=1)
    assert "cfg_scale" not in capsys.readouterr().out
