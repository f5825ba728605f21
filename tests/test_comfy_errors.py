"""User mistakes end in an execution_error that says what to fix, and the server carries on."""

from __future__ import annotations

import shutil

import pytest
from comfy_prompts import assert_succeeded, t2v_prompt

pytestmark = pytest.mark.comfy


def _missing_file(tiny, host):
    return t2v_prompt(tiny, TD_WanModelLoader={"model_name": "TurboWan2.1-T2V-1.3B-480P.pth"}), (
        "TD_WanModelLoader",
        ["TurboWan2.1-T2V-1.3B-480P.pth", "models/diffusion_models", "Put the file there"],
    )


def _frames_not_4n_plus_1(tiny, host):
    return t2v_prompt(tiny, TD_EmptyVideoLatent={"num_frames": 80}), (
        "TD_EmptyVideoLatent",
        ["4n+1", "got 80", "use 77 or 81"],
    )


def _i2v_expert_for_text_to_video(tiny, host):
    return t2v_prompt(tiny, TD_WanModelLoader={"model_name": tiny.files["i2v_high"]}), (
        "TD_RCMSampler",
        ["Wan2.2 I2V expert", "needs a start image", "TD_ImageToVideo", "T2V model"],
    )


def _vae_given_to_model_loader(tiny, host):
    models = host.base / "models"
    shutil.copy(models / "vae" / tiny.files["vae"], models / "diffusion_models" / "Wan2.1_VAE.pth")
    return t2v_prompt(tiny, TD_WanModelLoader={"model_name": "Wan2.1_VAE.pth"}), (
        "TD_WanModelLoader",
        ["Wan2.1_VAE.pth", "VAE", "VAE loader", "not a Wan diffusion model"],
    )


MISTAKES = [_missing_file, _frames_not_4n_plus_1, _i2v_expert_for_text_to_video, _vae_given_to_model_loader]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistake_ends_in_a_helpful_execution_error(comfy_host, tiny, mistake):
    prompt, (node_type, phrases) = mistake(tiny, comfy_host)
    result = comfy_host.client.run(prompt)
    assert result.status == "error"
    error = result.first("execution_error")
    assert error is not None, f"no execution_error: {result.events}"
    assert error["node_type"] == node_type
    for phrase in phrases:
        assert phrase in error["exception_message"], error["exception_message"]

    follow_up = comfy_host.client.run(t2v_prompt(tiny, seed=100 + MISTAKES.index(mistake)))
    assert_succeeded(follow_up, comfy_host)
