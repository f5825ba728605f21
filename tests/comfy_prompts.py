"""API prompts for the real-host tests: the shipped workflows pointed at the tiny checkpoints, made small."""

from __future__ import annotations

from pathlib import Path

import av
from comfy_tiny_models import TinyModels
from comfy_workflows import WORKFLOW_NAMES, load_api_workflow, node_id_of, with_overrides

T2V, I2V = WORKFLOW_NAMES
# 9 frames of 64x48 pixels: 3 latent frames of 8x6, small enough for a few seconds per run on 2 cores.
SMALL_VIDEO = {"width": 64, "height": 48, "num_frames": 9}


def t2v_prompt(tiny: TinyModels, seed: int = 0, **changes: dict) -> dict:
    """The shipped T2V API workflow with the tiny files and a small video; `changes` per class_type."""
    prompt = load_api_workflow(T2V)
    overrides = {
        "TD_WanModelLoader": {"model_name": tiny.files["t2v"]},
        "TD_TextEncoderLoader": {"text_encoder_name": tiny.files["text_encoder"]},
        "TD_VAELoader": {"vae_name": tiny.files["vae"]},
        "TD_EmptyVideoLatent": dict(SMALL_VIDEO),
        "TD_RCMSampler": {"seed": seed},
    }
    for class_type, inputs in changes.items():
        overrides.setdefault(class_type, {}).update(inputs)
    return with_overrides(prompt, {node_id_of(prompt, c): inputs for c, inputs in overrides.items()})


def i2v_prompt(tiny: TinyModels, image_name: str, seed: int = 0) -> dict:
    """The shipped I2V API workflow with the tiny expert pair, an uploaded start image and a small video."""
    prompt = load_api_workflow(I2V)
    sampler = node_id_of(prompt, "TD_RCMSampler")
    high, low = prompt[sampler]["inputs"]["model"][0], prompt[sampler]["inputs"]["low_noise_model"][0]
    overrides = {
        high: {"model_name": tiny.files["i2v_high"]},
        low: {"model_name": tiny.files["i2v_low"]},
        node_id_of(prompt, "TD_TextEncoderLoader"): {"text_encoder_name": tiny.files["text_encoder"]},
        node_id_of(prompt, "TD_VAELoader"): {"vae_name": tiny.files["vae"]},
        node_id_of(prompt, "LoadImage"): {"image": image_name},
        node_id_of(prompt, "TD_ImageToVideo"): dict(SMALL_VIDEO),
        sampler: {"seed": seed},
    }
    return with_overrides(prompt, overrides)


def assert_succeeded(result, host) -> None:
    """Fail with the node's error message and the server log when a prompt did not succeed."""
    error = result.first("execution_error")
    assert result.status == "success", f"{error and error['exception_message']}\n{host.log_tail(40)}"


def saved_files(outputs: dict, output_dir: Path) -> list[Path]:
    """Paths of the files that output nodes report in their ui dicts."""
    files = []
    for ui in outputs.values():
        for item in ui.get("images", []):
            files.append(output_dir / item.get("subfolder", "") / item["filename"])
    return files


def probe_video(path: Path) -> dict:
    """Frame count, size, frame rate and container tags of a video file, read by decoding it."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return {
            "frames": len(frames),
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate),
            "metadata": dict(container.metadata),
            "pixels": frames,
        }
