"""The MP4 off the critical path (issue 8): frames encoded while the VAE decodes, the same file as encoding
them afterwards, TurboDiffusion's uint8 rounding, and the Python API writing the video with its timings."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from comfyui_turbodiffusion.wan_models import generate_t2v, load_dit, load_vae
from comfyui_turbodiffusion.wan_models.video_file import (
    BackgroundVideoWriter,
    VideoFileWriter,
    video_to_uint8,
)
from dit_reference import make_diffusers_model, to_original_layout, to_turbodiffusion_layout
from vae_reference import random_original_state_dict


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(random_original_state_dict(base_dim=8, seed=3), path)
    return load_vae(path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "TurboWan-tiny.pth"
    torch.save(
        to_turbodiffusion_layout(to_original_layout(make_diffusers_model(16, seed=4).state_dict())), path
    )
    return load_dit(path, dtype=torch.float32)


def _latent(frames: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, frames, 6, 8, generator=torch.Generator().manual_seed(seed))


def _decoded_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_uint8_frames_round_as_turbodiffusion_and_put_samples_side_by_side():
    """§6.3: clamp, (1 + v)/2, floor(255·v + 0.5); samples stacked along the width."""
    video = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.002, 1 / 255, 0.999, 2.0]).reshape(2, 1, 1, 1, 4)
    video = video.expand(2, 3, 1, 1, 4).contiguous()
    frames = video_to_uint8(video.to(torch.bfloat16))
    expected = [[0, 0, 64, 128], [128, 128, 255, 255]]
    assert frames.shape == (1, 1, 8, 3) and frames.dtype == torch.uint8
    assert frames[0, 0, :, 0].tolist() == expected[0] + expected[1]
    assert torch.equal(frames[..., 0], frames[..., 2])


def test_decode_hands_out_each_pass_in_order(vae):
    chunks = []
    video = vae.decode(_latent(4), on_chunk=lambda first, frames: chunks.append((first, frames.clone())))
    assert [first for first, _ in chunks] == [0, 1, 5, 9]
    streamed = torch.cat([frames for _, frames in chunks], dim=2).float().clamp(-1, 1)
    assert torch.equal(streamed, video)

    tiled = []
    video = vae.decode(_latent(2), tile_size=4, tile_overlap=2, on_chunk=lambda *c: tiled.append(c))
    assert len(tiled) == 1 and tiled[0][0] == 0 and torch.equal(tiled[0][1], video)


def test_streamed_file_equals_the_file_encoded_afterwards(vae, tmp_path):
    latent = _latent(3, seed=1)
    streaming = BackgroundVideoWriter(
        VideoFileWriter(tmp_path / "streamed.mp4", 16, crf=19, preset="veryfast")
    )
    video = vae.decode(latent, on_chunk=streaming.add)
    path = streaming.finish()
    assert path == tmp_path / "streamed.mp4" and path.exists()

    afterwards = VideoFileWriter(tmp_path / "afterwards.mp4", 16, crf=19, preset="veryfast")
    afterwards.write(video_to_uint8(video).numpy())
    afterwards.close()

    streamed, reference = _decoded_frames(path), _decoded_frames(tmp_path / "afterwards.mp4")
    assert streamed.shape == (9, 48, 64, 3)
    assert np.array_equal(streamed, reference)
    # The encoding itself is lossy (yuv420p): it stays close to the frames it was given.
    assert np.abs(streamed.astype(int) - video_to_uint8(video).numpy().astype(int)).mean() < 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afterwards.mp4", "streamed.mp4"]


def test_an_aborted_stream_leaves_no_file(vae, tmp_path):
    streaming = BackgroundVideoWriter(VideoFileWriter(tmp_path / "v.mp4", 16))
    streaming.add(0, torch.zeros(1, 3, 1, 16, 16))
    with pytest.raises(ValueError, match="expected frame 1, got 5"):
        streaming.add(5, torch.zeros(1, 3, 4, 16, 16))
    streaming.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="0..51"):
        VideoFileWriter(tmp_path / "v.mp4", 16, crf=60)


def test_generate_t2v_writes_the_video_while_decoding(dit, vae, tmp_path):
    context = torch.zeros(1, 512, dit.config.text_dim)
    context[:, :5] = torch.randn(1, 5, dit.config.text_dim, generator=torch.Generator().manual_seed(2))
    options = dict(context=context, width=48, height=32, num_frames=5, steps=2, seed=3)
    plain = generate_t2v(dit, vae, **options)
    result = generate_t2v(dit, vae, output_path=tmp_path / "fox.mp4", return_frames=False, **options)

    assert result.frames is None and result.video_path == tmp_path / "fox.mp4"
    assert {"sampling", "vae_decoding", "video_encoding", "total"} <= set(result.timings)
    assert torch.equal(result.latent, plain.latent)
    written = _decoded_frames(result.video_path)
    assert written.shape == (5, 32, 48, 3)
    expected = torch.floor(plain.frames * 255 + 0.5).to(torch.uint8).numpy().astype(int)
    assert np.abs(written.astype(int) - expected).mean() < 8
    with pytest.raises(ValueError, match="must end in .mp4 or .webm"):
        generate_t2v(dit, vae, output_path=tmp_path / "fox.gif", **options)
