"""Video writing (formats, metadata, atomic files), TD_SaveVideo naming and TD_FreeVRAM, in-process."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from comfy_inprocess import import_comfy_and_nodes
from PIL import Image

METADATA = {"prompt": {"1": {"class_type": "TD_SaveVideo"}}, "workflow": {"nodes": [], "version": 0.4}}


@pytest.fixture(scope="module")
def pack():
    return import_comfy_and_nodes()


@pytest.fixture
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(9, 48, 64, 3), dtype=np.uint8)


def test_frames_are_rounded_as_turbodiffusion(pack):
    from comfyui_turbodiffusion.nodes.video_writer import frames_to_uint8

    images = torch.tensor([0.0, 0.5 / 255, 0.4 / 255, 1.0, 1.2, -0.1]).reshape(1, 1, 2, 3)
    assert frames_to_uint8(images).tolist() == [[[[0, 1, 0], [255, 255, 0]]]]


@pytest.mark.parametrize("video_format", ["mp4", "webm"])
def test_pyav_formats_keep_frames_size_rate_and_metadata(pack, tmp_path, frames, video_format):
    from comfyui_turbodiffusion.nodes.video_writer import write_video

    path = write_video(frames, tmp_path / f"v.{video_format}", 16.0, video_format, 19, METADATA)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        tags = {key.lower(): value for key, value in container.metadata.items()}
        assert float(stream.average_rate) == 16.0
    assert len(decoded) == 9 and decoded[0].shape == (48, 64, 3)
    assert json.loads(tags["prompt"]) == METADATA["prompt"]
    assert json.loads(tags["workflow"]) == METADATA["workflow"]


@pytest.mark.parametrize("video_format", ["gif", "webp"])
def test_animated_image_formats(pack, tmp_path, frames, video_format):
    from comfyui_turbodiffusion.nodes.video_writer import write_video

    path = write_video(frames, tmp_path / f"v.{video_format}", 10.0, video_format, 0, METADATA)
    with Image.open(path) as image:
        assert (image.n_frames, image.size) == (9, (64, 48))
        image.seek(1)
        image.load()
        assert image.info["duration"] == 100
        if video_format == "webp":
            exif = image.getexif()
            assert json.loads(exif[0x0110].removeprefix("prompt:")) == METADATA["prompt"]
            assert json.loads(exif[0x010F].removeprefix("workflow:")) == METADATA["workflow"]
            image.seek(0)
            assert np.array_equal(np.asarray(image.convert("RGB")), frames[0])  # crf 0 = lossless
        else:
            assert json.loads(image.info["comment"]) == METADATA


def test_failed_write_leaves_no_file(pack, tmp_path, frames):
    from comfyui_turbodiffusion.nodes.video_writer import write_video

    def interrupt_at_frame_4(done, total):
        if done == 4:
            raise pack[0].InterruptProcessingException()

    with pytest.raises(pack[0].InterruptProcessingException):
        write_video(frames, tmp_path / "v.mp4", 16.0, "mp4", 19, on_frame=interrupt_at_frame_4)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="0..51"):
        write_video(frames, tmp_path / "v.mp4", 16.0, "mp4", 60)


def test_odd_sizes_are_cropped_to_even_for_yuv420(pack, tmp_path):
    from comfyui_turbodiffusion.nodes.video_writer import write_video

    odd = np.zeros((5, 33, 47, 3), dtype=np.uint8)
    with av.open(str(write_video(odd, tmp_path / "v.mp4", 16.0, "mp4", 19))) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (46, 32)


def test_save_video_counts_files_and_previews(pack, tmp_path, frames):
    import folder_paths

    folder_paths.set_output_directory(str(tmp_path))
    node = pack[1].NODE_CLASS_MAPPINGS["TD_SaveVideo"]()
    images = torch.from_numpy(frames).float() / 255
    first = node.save(images, 16.0, "clips/TurboDiffusion", "mp4", 19, prompt={"1": {}}, extra_pnginfo=None)
    second = node.save(images, 16.0, "clips/TurboDiffusion", "webm", 19)
    names = [ui["ui"]["images"][0]["filename"] for ui in (first, second)]
    assert names == ["TurboDiffusion_00001_.mp4", "TurboDiffusion_00002_.webm"]
    assert first["ui"]["images"][0] == {"filename": names[0], "subfolder": "clips", "type": "output"}
    assert first["ui"]["animated"] == [True]
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == names


def test_free_vram_unloads_ours_and_passes_through(pack):
    from comfyui_turbodiffusion.nodes.model_patchers import load_to_device, loaded_models_of_ours, wrap_module

    cpu = torch.device("cpu")
    patcher = wrap_module(torch.nn.Linear(4, 4), cpu, cpu, "tiny.pth", "dit")
    load_to_device(patcher)
    assert [info.label for info in loaded_models_of_ours()] == ["tiny.pth"]
    node = pack[1].NODE_CLASS_MAPPINGS["TD_FreeVRAM"]()
    value = object()
    output = node.free(value, unload_models=False, empty_cache=True)
    assert output["result"] == (value,)
    assert "unloaded dit tiny.pth" in output["ui"]["text"][0]
    assert loaded_models_of_ours() == []
