"""The flash + beep dataset (data/make_flash_beep_dataset.py) and the sync metric (recipes/video_audio/sync).

The written mp4s are read back with PyAV and decord: their beeps and flashes must land on the events."""

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import decord
import make_flash_beep_dataset as fb
import numpy as np
import pytest
from video_probe import probe_video

from framework.data.audio_decode import decode_audio_window
from recipes.video_audio.sync import beep_onsets, brightness_rise, flash_times, match_events, sync_report

REPO = Path(__file__).resolve().parents[2]
CAPTION = re.compile(r"^a (red|green|blue|yellow) (circle|square|triangle) flashes (once|twice|three times)$")
WORDS = {v: k for k, v in fb.COUNTS.items()}
SEED, RATE, FPS = 3, 16000, 25


def _cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--out", str(out), "--seed", str(SEED), "--workers", "2", *extra]
    return subprocess.run([sys.executable, "data/make_flash_beep_dataset.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _samples(split_dir: Path) -> list[tuple[str, bytes, dict]]:
    """(key, mp4 bytes, meta) of every sample of a split, in index order."""
    index = json.loads((split_dir / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        with tarfile.open(split_dir / shard["path"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for item in shard["items"]:
            key = item["key"]
            assert files[f"{key}.txt"].decode() == json.loads(files[f"{key}.json"])["captions"][0]
            out.append((key, files[f"{key}.mp4"], json.loads(files[f"{key}.json"])))
    return out


def _decode(mp4: bytes) -> tuple[np.ndarray, np.ndarray, dict]:
    """PyAV: video frames (T, H, W, 3), mono audio cut at the audio stream's duration, and stream facts."""
    with av.open(io.BytesIO(mp4)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(io.BytesIO(mp4)) as c:
        stream = c.streams.audio[0]
        chunks = list(c.decode(stream))
        facts = {"codec": stream.codec_context.name, "rate": stream.sample_rate,
                 "channels": stream.codec_context.channels, "start_time": stream.start_time,
                 "first_pts": chunks[0].pts, "video_start": c.streams.video[0].start_time,
                 "samples": int(stream.duration * stream.time_base * stream.sample_rate)}
        audio = np.concatenate([f.to_ndarray()[0] for f in chunks])
    assert len(audio) >= facts["samples"]  # the last AAC frame is padded to 1024 samples
    return frames, audio[: facts["samples"]], facts


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flash_beep")
    run = _cli(out, "--train", "6", "--val", "2")
    assert run.returncode == 0, run.stderr
    assert "wrote 6 train clips" in run.stdout and "wrote 2 val clips" in run.stdout
    return out


def test_cli_writes_captioned_clips_with_audio_metadata(dataset):
    train, val = _samples(dataset / "train"), _samples(dataset / "val")
    assert [k for k, _, _ in train] == [f"train_{i:06d}" for i in range(6)]
    assert [k for k, _, _ in val] == ["val_000000", "val_000001"]
    for _, mp4, meta in train + val:
        colour, shape, count = CAPTION.match(meta["captions"][0]).groups()
        events = meta["events"]
        assert len(events) == WORDS[count] and {e["colour"] for e in events} == {colour}
        assert all(e["pitch_hz"] == fb.PITCHES[colour] and e["beep_time"] == e["time"] for e in events)
        assert [e["time"] for e in events] == [e["frame"] / FPS for e in events]
        assert meta["audio_rate"] == RATE and meta["audio_channels"] == 1 and meta["audio_offset_ms"] == 0
        assert meta["license"] == "CC0-1.0" and len(meta["captions"]) == 2
        # The index's fields are what a probe of the file says: 2 s of 64x64 at 25 fps, with sound.
        fields = {"fps": 25.0, "frames": 50, "width": 64, "height": 64, "duration": 2.0, "has_audio": True}
        assert probe_video(mp4) == {k: meta[k] for k in fields} == fields


def test_beeps_and_flashes_read_back_at_the_event_times(dataset):
    errors = []
    for _, mp4, meta in _samples(dataset / "train") + _samples(dataset / "val"):
        frames, audio, facts = _decode(mp4)
        # The AAC priming samples are dropped by the decoder (mp4 edit list): audio starts at pts 0, as video.
        assert facts == {"codec": "aac", "rate": RATE, "channels": 1, "start_time": 0, "first_pts": 0,
                         "video_start": 0, "samples": 2 * RATE}
        times = [e["time"] for e in meta["events"]]
        onsets = beep_onsets(audio, RATE)
        assert len(onsets) == len(times)
        errors += [1000 * (o - t) for o, t in zip(onsets, times)]
        # decord, the loader's decoder, reads the same frames' flashes and the same audio.
        vr = decord.VideoReader(io.BytesIO(mp4))
        assert flash_times(vr.get_batch(range(len(vr))).asnumpy(), vr.get_avg_fps()) == pytest.approx(times)
        assert flash_times(frames, FPS) == pytest.approx(times)
        ar = decord.AudioReader(io.BytesIO(mp4), sample_rate=RATE, mono=True)
        assert np.allclose(beep_onsets(ar[:].asnumpy()[0], RATE), onsets, atol=1e-4)
        # The pitch is the colour's: the strongest frequency of 60 ms of each beep, to the FFT's 16.7 Hz.
        for onset in onsets:
            piece = audio[int(onset * RATE) + 80: int(onset * RATE) + 80 + 960]
            spectrum = np.abs(np.fft.rfft(piece * np.hanning(len(piece))))
            assert np.fft.rfftfreq(len(piece), 1 / RATE)[spectrum.argmax()] == pytest.approx(
                meta["events"][0]["pitch_hz"], abs=17)
    # Measured: +0.22 to +0.36 ms (the 2 ms raised-cosine attack's foot, and AAC).
    assert max(abs(e) for e in errors) < 1.0, errors


def test_same_seed_gives_identical_shards_in_any_number_of_processes(dataset, tmp_path):
    index = fb.generate_split(tmp_path / "val", "val", 2, seed=SEED, workers=1, progress=False)
    assert index == json.loads((dataset / "val" / "index.json").read_text())
    for shard in index["shards"]:  # x264 and AAC bytes both reproducible, in this process and the CLI's pool
        mine, cli = tmp_path / "val" / shard["path"], dataset / "val" / shard["path"]
        assert mine.read_bytes() == cli.read_bytes()
    other = fb.generate_split(tmp_path / "other", "val", 2, seed=SEED + 1, workers=1, progress=False)
    assert (tmp_path / "other" / other["shards"][0]["path"]).read_bytes() != (
        tmp_path / "val" / index["shards"][0]["path"]).read_bytes()


def test_audio_offset_reads_back_through_sync_report(dataset, tmp_path):
    run = _cli(tmp_path / "late", "--train", "0", "--val", "2", "--audio-offset-ms", "120")
    assert run.returncode == 0, run.stderr
    late, aligned = _samples(tmp_path / "late" / "val"), _samples(dataset / "val")
    pairs = [_decode(mp4)[:2] for _, mp4, _ in late]
    events = sum(len(meta["events"]) for _, _, meta in late)
    report = sync_report(pairs, FPS, RATE)
    assert report["median_offset_ms"] == pytest.approx(120, abs=2)
    assert report["median_abs_offset_ms"] == pytest.approx(120, abs=2)
    assert report["within_40ms"] == 0.0 and report["events"] == events and report["unmatched"] == 0
    for _, mp4, meta in late:
        assert meta["audio_offset_ms"] == 120
        beeps = [e["beep_time"] for e in meta["events"]]
        assert beeps == pytest.approx([e["time"] + 0.12 for e in meta["events"]])
        # The loader's audio window [0.1 s, 1.9 s) on the video's clock hears them there too.
        wave, valid = decode_audio_window(mp4, 0.1, 1.8, RATE)
        assert valid.all() and np.max(np.abs(np.subtract(beep_onsets(wave[0], RATE, t0=0.1), beeps))) < 1e-3
    # Only the sound moved: the same seed gives the same pictures, and those files are in sync.
    aligned_pairs = [_decode(mp4)[:2] for _, mp4, _ in aligned]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(pairs, aligned_pairs))
    report = sync_report(aligned_pairs, FPS, RATE)
    assert abs(report["median_offset_ms"]) < 1 and report["within_40ms"] == 1.0 and report["events"] == events
    bad = _cli(tmp_path / "bad", "--audio-offset-ms", "-250")
    assert bad.returncode != 0 and "beyond +-200 ms" in bad.stderr and "Traceback" not in bad.stderr


def test_flash_frames_are_spaced_inside_the_clip_and_bad_timing_is_refused():
    step, first, last = 13, 5, 42  # frames at 25 fps: 0.52 s >= MIN_SPACING; 0.2 s; 2 s - 0.2 s - the beep
    assert step / FPS >= fb.MIN_SPACING > (step - 1) / FPS and first / FPS == fb.MAX_OFFSET
    for seed in range(200):
        frames = fb.flash_frames(3, FPS, 50, np.random.default_rng(seed))
        assert frames == sorted(frames) and first <= frames[0] and frames[-1] <= last
        assert min(np.diff(frames)) >= step
    seen = {tuple(fb.flash_frames(2, FPS, 50, np.random.default_rng(s))) for s in range(300)}
    assert len(seen) > 100  # many placements, not a fixed pattern
    assert len(fb.LABELS) == 36
    with pytest.raises(ValueError, match="do not fit in 30 frames"):
        fb.check_args(64, FPS, 30, RATE, 0.0)
    with pytest.raises(ValueError, match="beyond"):
        fb.check_args(64, FPS, 50, RATE, 201.0)
    with pytest.raises(ValueError, match="AAC cannot store 15000 Hz"):
        fb.check_args(64, FPS, 50, 15000, 0.0)
    fb.check_args(64, FPS, 50, RATE, -200.0)


def _video(flashes: list[int], frames: int = 50, size: int = 16) -> np.ndarray:
    """A dark clip in which a 6x6 square jumps to full red on each flash frame and fades over 3 frames."""
    video = np.full((frames, size, size, 3), 20, np.uint8)
    for k in flashes:
        for j, level in enumerate((230, 120, 60)):
            if k + j < frames:
                video[k + j, 5:11, 5:11, 0] = np.maximum(video[k + j, 5:11, 5:11, 0], level)
    return video


def _audio(onsets: list[float], seconds: float = 2.0, noise: float = 0.002, seed: int = 0) -> np.ndarray:
    """80 ms 660 Hz beeps with a *linear* 2 ms attack: the foot of the attack is exactly each onset."""
    t = np.arange(round(seconds * RATE)) / RATE
    audio = np.random.default_rng(seed).normal(0, noise, len(t))
    for onset in onsets:
        tau = t - onset
        env = np.clip(tau / 0.002, 0, 1) * np.clip((0.08 - tau) / 0.01, 0, 1)
        audio += 0.4 * env * np.sin(2 * np.pi * 660 * tau)
    return audio


def test_sync_report_on_synthetic_clips_gives_the_known_offsets():
    clips = [  # (flash frames, offsets in ms of their beeps; None = no beep), extra beeps (s)
        ([10, 30], [10.0, -30.0], []),
        ([5, 20, 40], [60.0, 20.0, -5.0], [1.4]),  # a beep with no flash (0.2 s from frame 40's)
        ([12, 25], [None, 0.0], []),  # a flash with no beep
    ]
    pairs = []
    for flashes, offsets, extra in clips:
        beeps = [k / FPS + o / 1000 for k, o in zip(flashes, offsets) if o is not None] + extra
        pairs.append((_video(flashes), _audio(beeps)))
    report = sync_report(pairs, FPS, RATE)
    # offsets 10, -30, 60, 20, -5, 0: medians 5 (signed) and 15 (absolute); 5 of 6 within 40 ms, out of 8.
    assert report["median_offset_ms"] == pytest.approx(5.0, abs=0.1)
    assert report["median_abs_offset_ms"] == pytest.approx(15.0, abs=0.1)
    assert report["events"] == 6 and report["unmatched"] == 2 and report["clips"] == 3
    assert report["within_40ms"] == pytest.approx(5 / 8)
    nothing = sync_report([(_video([]), _audio([]))], FPS, RATE)
    assert np.isnan(nothing["median_offset_ms"]) and nothing["within_40ms"] == 0.0 and nothing["events"] == 0
    with pytest.raises(ValueError, match="at least one"):
        sync_report([], FPS, RATE)


def test_match_events_pairs_nearest_first_within_max_gap():
    assert match_events([0.2, 0.8, 1.4], [0.25, 0.77, 2.0]) == pytest.approx([50.0, -30.0])
    # 1.15 is nearer 1.2 than 1.0: it pairs there, and 1.0 stays unmatched instead of stealing it.
    assert match_events([1.0, 1.2], [1.15]) == pytest.approx([-50.0])
    assert match_events([1.0], [1.3]) == []
    assert match_events([1.0], [1.3], max_gap=0.31) == pytest.approx([300])
    assert match_events([], [0.5]) == [] and match_events([0.5], []) == []


def test_beep_onsets_are_exact_for_linear_attacks_and_ignore_noise():
    onsets = [0.1234, 0.61, 1.3071]
    # White noise of RMS 0, 0.002, 0.01 (-54, -40 dBFS: 32 dB under the beeps). Measured: 3, 25, 110 us.
    for noise, tolerance in ((0.0, 1e-5), (0.002, 5e-5), (0.01, 2.5e-4)):
        found = beep_onsets(_audio(onsets, noise=noise), RATE)
        assert len(found) == 3 and np.max(np.abs(np.subtract(found, onsets))) < tolerance, (noise, found)
    assert beep_onsets(_audio(onsets), RATE, t0=5.0) == pytest.approx(np.add(onsets, 5.0), abs=1e-4)
    # The generator's raised-cosine attack reads 0.16 of its 2 ms late.
    beeps = fb.render_audio(onsets, [440.0] * 3, 2.0, RATE, np.random.default_rng(0))
    assert np.subtract(beep_onsets(beeps, RATE), onsets) == pytest.approx([0.00032] * 3, abs=1e-4)
    assert beep_onsets(np.zeros(RATE), RATE) == []
    assert beep_onsets(np.random.default_rng(0).normal(0, 0.01, RATE), RATE) == []
    with pytest.raises(ValueError, match="mono"):
        beep_onsets(np.zeros((2, RATE)), RATE)


def test_flash_times_report_frame_starts_of_brightness_jumps():
    video = _video([7, 19, 33])
    assert flash_times(video, FPS) == pytest.approx([0.28, 0.76, 1.32])
    assert flash_times(video, FPS, t0=1.0) == pytest.approx([1.28, 1.76, 2.32])
    assert flash_times(video.astype(np.float32) / 255, FPS) == pytest.approx([0.28, 0.76, 1.32])
    assert flash_times(_video([0, 20]), FPS) == pytest.approx([0.8])  # frame 0 has nothing to jump from
    assert flash_times(np.full((10, 8, 8, 3), 200, np.uint8), FPS) == []
    # A flash that brightens over two frames counts once, at its bigger step; small flicker not at all.
    ramp = np.full((10, 8, 8, 3), 20, np.uint8)
    ramp[4:, :, :, 1], ramp[5:, :, :, 1] = 90, 220
    flicker = np.random.default_rng(0).integers(18, 23, (10, 8, 8, 3)).astype(np.uint8)
    assert flash_times(ramp, FPS) == pytest.approx([0.2]) and flash_times(flicker, FPS) == []
    # Saturated blue jumps as far as yellow (max(R, G, B), not luma).
    blue, yellow = np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)
    blue[1, ..., 2], yellow[1, ..., :2] = 235, 235
    assert brightness_rise(blue)[1] == brightness_rise(yellow)[1] == 235
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        flash_times(np.zeros((4, 8, 8)), FPS)
