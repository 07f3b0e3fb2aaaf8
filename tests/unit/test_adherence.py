"""The analytic prompt-adherence detector against the shapes generator's own (H.264-compressed) clips."""

import io

import av
import make_shapes_dataset as shapes
import numpy as np
import pytest

from recipes.video_dit.adherence import CHANCE, DIRECTIONS, PALETTE, SHAPES, adherence, detect, parse_prompt


def _decoded_clips(n: int, seed: int = 11) -> tuple[list[np.ndarray], list[str]]:
    """n generated clips (every label twice for n=96) decoded back from their mp4 bytes, and their prompts."""
    videos, prompts = [], []
    for i in range(n):
        label = shapes.LABELS[i % 48]
        _, data, meta = shapes.make_sample(i, "val", label, seed=seed, size=64, frames=17, fps=8)
        with av.open(io.BytesIO(data)) as c:
            videos.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
        prompts.append(meta["captions"][i % 2])  # both caption variants
    return videos, prompts


@pytest.fixture(scope="module")
def clips() -> tuple[list[np.ndarray], list[str]]:
    return _decoded_clips(96)


def test_vocabulary_matches_the_generator():
    assert PALETTE == shapes.COLOURS and SHAPES == shapes.SHAPES and DIRECTIONS == tuple(shapes.DIRECTIONS)
    assert CHANCE == {"colour": 1 / 4, "shape": 1 / 3, "direction": 1 / 4, "all": 1 / 48}


def test_parse_prompt():
    assert parse_prompt("a red circle moves left") == ("red", "circle", "left")
    assert parse_prompt("A Yellow triangle moving to the right across a grey background") == (
        "yellow", "triangle", "right")
    assert parse_prompt("a blue square drifting upwards") == ("blue", "square", "up")
    assert parse_prompt("a purple hexagon spins") == (None, None, None)
    assert parse_prompt("green, moving down") == ("green", None, "down")


def test_detect_reads_the_labels_of_compressed_clips(clips):
    videos, prompts = clips
    assert adherence(videos, prompts) == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}
    # Float videos in [0, 1] or in [-1, 1] (a model's output range) read the same.
    assert detect(videos[5] / 255.0) == detect(videos[5]) == parse_prompt(prompts[5])
    assert detect(videos[7] / 127.5 - 1, value_range=(-1, 1)) == parse_prompt(prompts[7])


def test_mismatched_prompts_and_noise_score_near_chance(clips):
    videos, prompts = clips
    rng = np.random.default_rng(0)
    shuffled = adherence(videos, [prompts[i] for i in rng.permutation(len(prompts))])
    noise_videos = [rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8) for _ in range(48)]
    noise = adherence(noise_videos, prompts[:48])
    for scores in (shuffled, noise):
        for key in ("colour", "shape", "direction"):
            assert abs(scores[key] - CHANCE[key]) < 0.2, (key, scores)
        assert scores["all"] < 0.1
    blank = np.full((5, 32, 32, 3), 60, np.uint8)
    assert detect(blank) == (None, None, None)
    assert adherence([blank], ["a red circle moves left"])["all"] == 0.0


def test_adherence_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        detect(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one"):
        adherence([], [])
    with pytest.raises(ValueError):
        adherence([np.zeros((2, 8, 8, 3), np.uint8)], [])  # lengths differ
