"""The video autoencoder on a tiny randomly initialised AutoencoderKL (no hub access)."""

import pytest
import torch

from openvid_models.vae import SCALING_FACTOR, VideoAutoencoder
from tests.openvid_models.utils import tiny_vae

pytest.importorskip("diffusers")


def test_frames_are_coded_one_by_one_in_any_micro_batch(tmp_path):
    vae = tiny_vae()
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = VideoAutoencoder(vae, micro_batch_size=3).encode(video, sample=False)
        assert latents.shape == (2, 4, 5, 8, 8)
        frame = vae.encode(video[1, :, 2][None]).latent_dist.mode()[0] * SCALING_FACTOR
        torch.testing.assert_close(latents[1, :, 2], frame)
        torch.testing.assert_close(VideoAutoencoder(vae).encode(video, sample=False), latents)
        pixels = VideoAutoencoder(vae, micro_batch_size=4).decode(latents)
        assert pixels.shape == video.shape
        torch.testing.assert_close(pixels[0, :, 4], vae.decode(latents[0, :, 4][None] / SCALING_FACTOR).sample[0])
        sampled = VideoAutoencoder(vae).encode(video, generator=torch.Generator().manual_seed(0))
        assert sampled.shape == latents.shape and not torch.equal(sampled, latents)
    vae.save_pretrained(tmp_path / "vae")
    loaded = VideoAutoencoder.from_pretrained(tmp_path / "vae", micro_batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video, sample=False), latents)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        VideoAutoencoder(vae, micro_batch_size=0)
