"""Causal video VAE: shapes, causality in time, chunked == whole-clip, bounded caches and a quick overfit."""

import math

import pytest
import torch

from framework.nn.causal_conv import CausalConv3d, FeatureCache
from recipes.video_vae.model import VideoVAE, VideoVAEConfig, kl_divergence

ATOL = 1e-5


def build(seed: int = 0) -> VideoVAE:
    torch.manual_seed(seed)
    return VideoVAE(VideoVAEConfig.tiny()).eval()


def video(frames: int, h: int = 32, w: int = 32, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, frames, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stride_t", [1, 2])
def test_causal_conv_chunks_equal_whole(stride_t):
    conv = CausalConv3d(4, 5, (3, 3, 3), (stride_t, 1, 1))
    x = torch.randn(2, 4, 13, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, _ = conv(x)
        cache, parts = None, []
        for start, stop in [(0, 1), (1, 5), (5, 9), (9, 13)]:  # chunk sizes are multiples of the stride
            y, cache = conv(x[:, :, start:stop], cache)
            parts.append(y)
    assert whole.shape[2] == 1 + 12 // stride_t
    assert cache.shape[2] == 3 - stride_t
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=ATOL, rtol=0)


def test_causal_conv_sees_only_the_past():
    conv = CausalConv3d(2, 2)
    x = torch.randn(1, 2, 8, 5, 5)
    bumped = x.clone()
    bumped[:, :, 5] += 1.0
    with torch.no_grad():
        a, b = conv(x)[0], conv(bumped)[0]
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], atol=0, rtol=0)
    assert not torch.allclose(a[:, :, 5], b[:, :, 5])


@pytest.mark.parametrize("k,h,w", [(0, 32, 32), (1, 32, 32), (4, 16, 24)])
def test_shapes_round_trip(k, h, w):
    vae, x = build(), video(1 + 4 * k, h, w, batch=2)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        x_hat = vae.decode(mean)
    assert mean.shape == logvar.shape == (2, 16, 1 + k, h // 8, w // 8) == vae.latent_shape(x.shape)
    assert x_hat.shape == x.shape
    assert vae.compression == (4, 8, 8)


def test_bad_frame_count_is_named():
    vae = build()
    with pytest.raises(ValueError, match="video has 4 frames"):
        vae.encode(video(4))
    with pytest.raises(ValueError, match="video has 8 frames"):
        vae.latent_shape((1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(video(5, 20, 32))


@pytest.mark.parametrize("frame", [0, 1, 4, 5, 9, 16])
def test_encoder_is_causal(frame):
    vae, x = build(), video(17)
    bumped = x.clone()
    bumped[:, :, frame] += 1.0
    with torch.no_grad():
        a, b = vae.encode(x, chunked=False)[0], vae.encode(bumped, chunked=False)[0]
    first_moved = math.ceil(frame / 4)  # latent i covers frames 4i-3 .. 4i
    torch.testing.assert_close(a[:, :, :first_moved], b[:, :, :first_moved], atol=ATOL, rtol=0)
    assert not torch.allclose(a[:, :, first_moved], b[:, :, first_moved])


@pytest.mark.parametrize("latent", [0, 1, 2, 4])
def test_decoder_is_causal(latent):
    vae = build()
    z = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    bumped = z.clone()
    bumped[:, :, latent] += 1.0
    with torch.no_grad():
        a, b = vae.decode(z, chunked=False), vae.decode(bumped, chunked=False)
    first_frame = max(0, 4 * latent - 3)  # latent i decodes to frames 4i-3 .. 4i (latent 0 to frame 0)
    torch.testing.assert_close(a[:, :, :first_frame], b[:, :, :first_frame], atol=ATOL, rtol=0)
    for f in range(first_frame, 4 * latent + 1):
        assert not torch.allclose(a[:, :, f], b[:, :, f])


@pytest.mark.parametrize("frames", [1, 17, 33])
def test_chunked_equals_whole(frames):
    vae, x = build(), video(frames, batch=2)
    with torch.no_grad():
        mean, logvar = vae.encode(x, chunked=False)
        mean_c, logvar_c = vae.encode(x, chunked=True)
        x_hat, x_hat_c = vae.decode(mean, chunked=False), vae.decode(mean, chunked=True)
    torch.testing.assert_close(mean_c, mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(logvar_c, logvar, atol=ATOL, rtol=0)
    torch.testing.assert_close(x_hat_c, x_hat, atol=ATOL, rtol=0)


def test_long_clip_caches_stay_fixed_size():
    vae, x = build(), video(1 + 4 * 16, 16, 16)
    enc_fc, dec_fc, sizes, latents, frames = FeatureCache(), FeatureCache(), [], [], []
    with torch.no_grad():
        chunks = [x[:, :, :1]] + [x[:, :, i : i + 4] for i in range(1, x.shape[2], 4)]
        for chunk in chunks:
            latents.append(vae.encoder(chunk, enc_fc)[:, :16])
            frames.append(vae.decoder(latents[-1], dec_fc))
            sizes.append((enc_fc.numel(), dec_fc.numel()))
        whole_mean = vae.encode(x, chunked=False)[0]
    assert [f.shape[2] for f in frames] == [1] + [4] * 16
    assert len(set(sizes[1:])) == 1, sizes  # no growth with the number of chunks
    torch.testing.assert_close(torch.cat(latents, dim=2), whole_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(vae.encode(x, chunked=True)[0], whole_mean, atol=ATOL, rtol=0)


def test_forward_sampling_kl_and_latent_scaling():
    vae, x = build(), video(5, batch=2)
    with torch.no_grad():
        a = vae(x, gen=torch.Generator().manual_seed(3))
        b = vae(x, gen=torch.Generator().manual_seed(3))
        c = vae(x, gen=torch.Generator().manual_seed(4))
    for t, u in zip(a, b):
        torch.testing.assert_close(t, u, atol=0, rtol=0)
    assert not torch.allclose(a[0], c[0])
    zeros = torch.zeros(2, 16, 2, 4, 4)
    assert kl_divergence(zeros, zeros).item() == 0.0 and VideoVAE.kl(
        zeros + 1, zeros
    ).item() == pytest.approx(0.5)
    vae.scale_factor, vae.shift = 0.5, 0.1
    torch.testing.assert_close(vae.denormalize_latent(vae.normalize_latent(a[1])), a[1])


def test_overfits_one_clip():
    vae = build()
    vae.train()
    t, yy, xx = torch.meshgrid(
        torch.arange(9.0), torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij"
    )
    clip = torch.stack([torch.sin(3 * xx + 0.3 * t), torch.cos(2 * yy - 0.2 * t), xx * yy]).unsqueeze(0)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        mean, _ = vae.encode(clip, chunked=False)
        loss = (vae.decode(mean, chunked=False) - clip).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
