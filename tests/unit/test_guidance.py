"""Classifier-free guidance: condition dropout, the CFG combination and the one-forward guided model_fn."""

import pytest
import torch

from framework.diffusion.flow import euler_sample, flow_sigmas
from framework.diffusion.gaussian import ddim_sample, linear_schedule
from framework.diffusion.guidance import Guidance, cfg_combine, drop_condition, guided, replace_dropped

B = 3


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Counting:
    """A conditional model_fn that records the batch size of every forward call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, *, text, mask=None):
        self.batches.append(x.shape[0])
        out = x * t.view(-1, 1) + text.sum(dim=1, keepdim=True) ** 2
        return out if mask is None else out * mask


def inputs():
    x = torch.randn(B, 4, generator=gen(0))
    t = torch.tensor([0.1, 0.5, 0.9])
    return x, t, {"text": torch.randn(B, 5, generator=gen(1))}


def test_drop_condition():
    assert bool(drop_condition(100, 0.0, gen()).all())
    assert not bool(drop_condition(100, 1.0, gen()).any())
    keep = drop_condition(20000, 0.1, gen(3))
    assert keep.dtype == torch.bool and keep.shape == (20000,)
    assert abs(keep.float().mean().item() - 0.9) < 0.01
    assert torch.equal(keep, drop_condition(20000, 0.1, gen(3)))
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        drop_condition(4, 1.5, gen())


def test_replace_dropped_uses_null_rows():
    cond, null = torch.ones(3, 2, 4), torch.zeros(1, 2, 4)
    out = replace_dropped(cond, null, torch.tensor([True, False, True]))
    assert torch.equal(out[1], null[0]) and torch.equal(out[[0, 2]], cond[[0, 2]])


def test_cfg_combine():
    c, u = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_combine(c, u, 1.0), c)
    assert torch.equal(cfg_combine(c, u, 0.0), u)
    assert torch.equal(cfg_combine(c, u, 3.0), torch.tensor([4.0, 10.0]))
    both = cfg_combine({"video": c, "audio": (c, u)}, {"video": u, "audio": (u, u)}, 2.0)
    assert torch.equal(both["video"], u + 2 * (c - u)) and torch.equal(both["audio"][1], u)


def test_scale_one_is_the_conditional_model_with_one_pass():
    model, (x, t, cond) = Counting(), inputs()
    out = guided(model, 1.0, {"text": torch.zeros(1, 5)})(x, t, **cond)
    assert model.batches == [B]
    assert torch.equal(out, Counting()(x, t, **cond))


@pytest.mark.parametrize("null_rows", [1, B])
def test_guided_is_one_batched_forward_equal_to_manual_cfg(null_rows):
    model, (x, t, cond) = Counting(), inputs()
    null = torch.randn(null_rows, 5, generator=gen(2))
    out = guided(model, 4.5, {"text": null})(x, t, **cond)
    assert model.batches == [2 * B]
    reference = Counting()
    expected = cfg_combine(reference(x, t, **cond), reference(x, t, text=null.expand(B, 5)), 4.5)
    torch.testing.assert_close(out, expected)


def test_keys_without_a_null_are_repeated_and_dict_outputs_combine_per_modality():
    (x, t, cond), mask = inputs(), torch.tensor([[1.0], [0.0], [1.0]])
    null = {"text": torch.zeros(1, 5)}

    def two_streams(x, t, *, text, mask):
        return {"video": Counting()(x, t, text=text, mask=mask), "audio": text[:, :2] * mask}

    out = guided(two_streams, 2.0, null)(x, t, **cond, mask=mask)
    cond_out = two_streams(x, t, text=cond["text"], mask=mask)
    null_out = two_streams(x, t, text=torch.zeros(B, 5), mask=mask)
    for key in ("video", "audio"):
        torch.testing.assert_close(out[key], null_out[key] + 2.0 * (cond_out[key] - null_out[key]))


def test_bad_null_condition_errors_name_the_key():
    x, t, cond = inputs()
    with pytest.raises(ValueError, match=r"'text' has shape \(1, 7\), expected \(1 or 3, 5\)"):
        guided(Counting(), 2.0, {"text": torch.zeros(1, 7)})(x, t, **cond)
    with pytest.raises(KeyError, match="pooled"):
        guided(Counting(), 2.0, {"text": torch.zeros(1, 5), "pooled": torch.zeros(1, 2)})(x, t, **cond)


def test_samplers_apply_guidance():
    # For a model whose velocity is its condition, CFG equals the unguided model on the combined condition.
    def velocity_is_condition(x, t, *, y):
        return y.expand_as(x)

    y, null, sigmas = torch.tensor([[1.0], [-2.0]]), torch.zeros(1, 1), flow_sigmas(4)
    noise = torch.randn(2, 3, generator=gen(0))
    out = euler_sample(velocity_is_condition, noise, sigmas, {"y": y}, Guidance(3.0, {"y": null}))
    expected = euler_sample(velocity_is_condition, noise, sigmas, {"y": null + 3.0 * (y - null)})
    torch.testing.assert_close(out, expected)

    model = Counting()
    ddim_sample(lambda x, t, **c: model(x, t, **c) * 0, (B, 4), linear_schedule(), "eps", steps=3, eta=0.0,
                gen=gen(0), cond=inputs()[2], guidance=Guidance(2.0, {"text": torch.zeros(1, 5)}))
    assert model.batches == [2 * B] * 3


def test_per_modality_scales():
    x, t, cond = inputs()

    def two_streams(x, t, *, text):
        return {"video": x * text[:, :1], "audio": x + text[:, 1:2]}

    null = {"text": torch.zeros(1, 5)}
    out = guided(two_streams, {"video": 5.0, "audio": 1.5}, null)(x, t, **cond)
    c, u = two_streams(x, t, **cond), two_streams(x, t, text=torch.zeros(B, 5))
    torch.testing.assert_close(out["video"], u["video"] + 5.0 * (c["video"] - u["video"]))
    torch.testing.assert_close(out["audio"], u["audio"] + 1.5 * (c["audio"] - u["audio"]))
    with pytest.raises(KeyError, match=r"given for \['video'\], the model outputs \['audio', 'video'\]"):
        guided(two_streams, {"video": 5.0}, null)(x, t, **cond)
