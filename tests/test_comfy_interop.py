"""Our LATENT / IMAGE / CONDITIONING against independent references and ComfyUI's core nodes.

The sampler's LATENT is saved with core SaveLatent and compared with the TurboDiffusion sampler written out
from the spec (tests/pipeline_mocks.spec_sample) around diffusers' Wan transformer, transformers' umT5 and
diffusers' Wan VAE holding the same (stored) weights; it must be the raw VAE mean, as ComfyUI keeps Wan
latents. Core VAEDecode / VAEEncode with the same VAE file, and CreateVideo / SaveVideo, must work with our
nodes' LATENT and IMAGE.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_prompts import SMALL_VIDEO, assert_succeeded, i2v_prompt, probe_video, t2v_prompt
from comfy_workflows import node_id_of
from dit_reference import DiffusersNetwork
from PIL import Image
from pipeline_mocks import spec_sample
from pipeline_torchvision import import_transforms_v2
from safetensors.torch import load_file
from text_encoder_fixtures import TRAINING_PROMPTS, reference_context, reference_ids, write_tokenizer_folder
from vae_reference import diffusers_vae, latent_stats, reference_encode

pytestmark = pytest.mark.comfy
# Characters outside the tiny tokenizer's vocabulary are tokenized differently by SentencePiece's byte
# fallback and by transformers' converted tokenizer; the prompt sticks to what the tokenizer was trained on.
PROMPT = TRAINING_PROMPTS[0]


def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def _latent_shape(batch: int = 1) -> tuple[int, ...]:
    frames = 1 + (SMALL_VIDEO["num_frames"] - 1) // 4
    return (batch, 16, frames, SMALL_VIDEO["height"] // 8, SMALL_VIDEO["width"] // 8)


def _save_latent_of_sampler(prompt: dict) -> dict:
    """Replace the decoding part of a prompt by core SaveLatent on the sampler's output."""
    sampler = node_id_of(prompt, "TD_RCMSampler")
    for class_type in ("TD_VAEDecode", "TD_SaveVideo"):
        del prompt[node_id_of(prompt, class_type)]
    prompt["80"] = _node("SaveLatent", samples=[sampler, 0], filename_prefix="latents/td")
    return prompt


def _saved_latent(host, result) -> torch.Tensor:
    (saved,) = result.outputs["80"]["latents"]
    return load_file(str(host.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def _reference_context(tiny, text: str, folder) -> torch.Tensor:
    ids, mask = reference_ids([text], write_tokenizer_folder(folder, tiny.spiece))
    return reference_context(tiny.text_encoder, ids, mask)


def _raw_vae_mean(normalised: np.ndarray) -> torch.Tensor:
    mean, std = latent_stats()
    return torch.from_numpy(normalised) * std + mean


def test_t2v_latent_matches_the_reference_sampler(comfy_host, tiny, tmp_path):
    prompt = _save_latent_of_sampler(
        t2v_prompt(
            tiny,
            seed=7,
            TD_WanModelLoader={"attention": "sdpa"},
            TD_RCMSampler={"steps": 3},
            TD_TextEncode={"text": PROMPT},
        )
    )
    result = comfy_host.client.run(prompt)
    assert_succeeded(result, comfy_host)
    ours = _saved_latent(comfy_host, result)

    context = _reference_context(tiny, PROMPT, tmp_path / "tokenizer")
    network = DiffusersNetwork(tiny.dits["t2v"])
    expected, _, _ = spec_sample(
        network, None, context, _latent_shape(), seed=7, steps=3, sigma_max=80, ode=False
    )
    reference = _raw_vae_mean(expected)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=1e-3)
    # A normalised (not raw) latent would differ by the per-channel mean and std.
    assert (ours - torch.from_numpy(expected)).abs().max() > 0.1


def test_i2v_latent_matches_the_reference_sampler(comfy_host, tiny, start_image, tmp_path):
    prompt = _save_latent_of_sampler(i2v_prompt(tiny, start_image, seed=9))
    for node in prompt.values():
        if node["class_type"] == "TD_WanModelLoader":
            node["inputs"]["attention"] = "sdpa"
    prompt[node_id_of(prompt, "TD_RCMSampler")]["inputs"]["mode"] = "ode"
    prompt[node_id_of(prompt, "TD_TextEncode")]["inputs"]["text"] = PROMPT
    result = comfy_host.client.run(prompt)
    assert_succeeded(result, comfy_host)
    ours = _saved_latent(comfy_host, result)

    transforms = import_transforms_v2()
    pixels = transforms.functional.pil_to_tensor(
        Image.open(comfy_host.base / "input" / start_image).convert("RGB")
    )
    resized = transforms.Resize((SMALL_VIDEO["height"], SMALL_VIDEO["width"]), antialias=True)(pixels)
    image = (resized.float() / 255 - 0.5) / 0.5
    video = torch.zeros(1, 3, SMALL_VIDEO["num_frames"], SMALL_VIDEO["height"], SMALL_VIDEO["width"])
    video[:, :, 0] = image
    encoded = reference_encode(diffusers_vae(tiny.vae_state, base_dim=8), video)
    mask = torch.zeros(1, 4, *encoded.shape[2:])
    mask[:, :, 0] = 1
    y = torch.cat([mask, encoded], dim=1)

    context = _reference_context(tiny, PROMPT, tmp_path / "tokenizer")
    high, low = DiffusersNetwork(tiny.dits["i2v_high"]), DiffusersNetwork(tiny.dits["i2v_low"])
    expected, used, _ = spec_sample(
        high, low, context, _latent_shape(), seed=9, steps=4, sigma_max=200, ode=True, y=y
    )
    assert used == ["high_noise", "high_noise", "low_noise", "low_noise"]
    torch.testing.assert_close(ours, _raw_vae_mean(expected), atol=1e-3, rtol=1e-3)


def test_core_vae_nodes_and_video_nodes_work_with_ours(comfy_host, tiny):
    prompt = t2v_prompt(tiny, seed=5)
    sampler, decode = node_id_of(prompt, "TD_RCMSampler"), node_id_of(prompt, "TD_VAEDecode")
    our_vae = prompt[decode]["inputs"]["vae"]
    prompt.update(
        {
            "60": _node("VAELoader", vae_name=tiny.files["vae"]),
            "61": _node("VAEDecode", samples=[sampler, 0], vae=["60", 0]),
            "62": _node("SaveImage", images=["61", 0], filename_prefix="interop/core"),
            "63": _node("SaveImage", images=[decode, 0], filename_prefix="interop/ours"),
            "64": _node("VAEEncode", pixels=[decode, 0], vae=["60", 0]),
            "65": _node("TD_VAEDecode", samples=["64", 0], vae=our_vae),
            "66": _node("VAEDecode", samples=["64", 0], vae=["60", 0]),
            "67": _node("SaveImage", images=["65", 0], filename_prefix="interop/ours2"),
            "68": _node("SaveImage", images=["66", 0], filename_prefix="interop/core2"),
            "69": _node("CreateVideo", images=[decode, 0], fps=16.0),
            "70": _node(
                "SaveVideo", video=["69", 0], filename_prefix="interop/core", format="auto", codec="auto"
            ),
        }
    )
    result = comfy_host.client.run(prompt)
    assert_succeeded(result, comfy_host)
    output = comfy_host.base / "output"

    def frames(node: str) -> np.ndarray:
        images = result.outputs[node]["images"]
        return np.stack([np.asarray(Image.open(output / i["subfolder"] / i["filename"])) for i in images])

    assert frames("63").shape == (SMALL_VIDEO["num_frames"], SMALL_VIDEO["height"], SMALL_VIDEO["width"], 3)
    assert np.abs(frames("62").astype(int) - frames("63").astype(int)).max() <= 1
    assert np.abs(frames("67").astype(int) - frames("68").astype(int)).max() <= 1
    (video,) = result.outputs["70"]["images"]
    info = probe_video(output / video["subfolder"] / video["filename"])
    assert (info["frames"], info["width"], info["height"]) == (9, 64, 48)


def test_core_wan_image_to_video_conditioning_drives_our_sampler(comfy_host, tiny):
    """Core WanImageToVideo (core VAE) and TD_ImageToVideo give the sampler the same start-image condition."""
    pixels = np.random.default_rng(5).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfy_host.base / "input" / "start_64x48.png")
    prompt = _save_latent_of_sampler(i2v_prompt(tiny, "start_64x48.png", seed=13))
    for node in prompt.values():
        if node["class_type"] == "TD_WanModelLoader":
            node["inputs"]["attention"] = "sdpa"
    sampler, ours = node_id_of(prompt, "TD_RCMSampler"), node_id_of(prompt, "TD_ImageToVideo")
    text, image = prompt[ours]["inputs"]["positive"], prompt[ours]["inputs"]["start_image"]
    size = {"width": 64, "height": 48, "length": SMALL_VIDEO["num_frames"], "batch_size": 1}
    core_sampler = dict(prompt[sampler]["inputs"], positive=["91", 0], latent=["91", 2])
    prompt.update(
        {
            "90": _node("VAELoader", vae_name=tiny.files["vae"]),
            "91": _node(
                "WanImageToVideo", positive=text, negative=text, vae=["90", 0], start_image=image, **size
            ),
            "92": _node("TD_RCMSampler", **core_sampler),
            "93": _node("SaveLatent", samples=["92", 0], filename_prefix="latents/core"),
        }
    )
    result = comfy_host.client.run(prompt)
    assert_succeeded(result, comfy_host)
    (core_saved,) = result.outputs["93"]["latents"]
    core = load_file(str(comfy_host.base / "output" / core_saved["subfolder"] / core_saved["filename"]))
    torch.testing.assert_close(core["latent_tensor"], _saved_latent(comfy_host, result), atol=1e-3, rtol=1e-3)
