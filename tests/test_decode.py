"""Chunked (and, for SDXL-size latents, tiled) VAE decoding on a tiny pipeline."""

from __future__ import annotations

import numpy as np
import torch

from components.generation import decode_latents
from tests.threads import one_thread  # noqa: F401
from tests.tiny import tiny_pipeline


def _recording(vae, sizes: list):
    decode = vae.decode

    def wrapped(z, *args, **kwargs):
        sizes.append(z.shape[0])
        return decode(z, *args, **kwargs)
    return wrapped


def test_chunked_decoding_equals_one_call_and_bounds_the_vae_batch():
    pipe = tiny_pipeline()
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = decode_latents(pipe, z, chunk_size=5)
    sizes: list = []
    pipe.vae.decode = _recording(pipe.vae, sizes)
    chunked = decode_latents(pipe, z, chunk_size=2)
    assert sizes == [2, 2, 1]
    assert chunked.dtype == np.uint8 and chunked.shape == (5, 16, 16, 3)
    assert np.array_equal(chunked, whole)


def test_large_latents_decode_in_tiles_and_leave_the_vae_as_it_was():
    pipe = tiny_pipeline()
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = decode_latents(pipe, z, tile_size=None)
    # untiled unless asked, as the stock pipelines decode (tiles change pixels at their seams)
    assert np.array_equal(decode_latents(pipe, z), plain)
    tiled = decode_latents(pipe, z, tile_size=16)
    assert tiled.shape == plain.shape == (2, 64, 64, 3)
    assert not np.array_equal(tiled, plain)  # the tiled path ran (blended seams differ a little)
    assert np.corrcoef(tiled.ravel(), plain.ravel())[0, 1] > 0.9
    assert pipe.vae.use_tiling is False and pipe.vae.tile_latent_min_size != 16
    assert np.array_equal(decode_latents(pipe, z[:, :, :8, :8], tile_size=16),
                          decode_latents(pipe, z[:, :, :8, :8], tile_size=None))
