"""The shipped API workflows run in a real ComfyUI server with tiny checkpoints and write playable videos."""

from __future__ import annotations

import json

import pytest
from comfy_prompts import T2V, assert_succeeded, i2v_prompt, probe_video, saved_files, t2v_prompt
from comfy_workflows import load_ui_workflow, node_id_of

pytestmark = pytest.mark.comfy


def test_t2v_workflow_writes_the_video(comfy_host, tiny):
    prompt = t2v_prompt(tiny, seed=1)
    workflow = load_ui_workflow(T2V)
    result = comfy_host.client.run(prompt, extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert_succeeded(result, comfy_host)

    save = node_id_of(prompt, "TD_SaveVideo")
    ui = result.outputs[save]
    assert ui["animated"] == [True]
    (video,) = saved_files(result.outputs, comfy_host.base / "output")
    assert video.name.startswith("TurboDiffusion_") and video.name.endswith("_.mp4")
    info = probe_video(video)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (9, 64, 48, 16.0)
    assert json.loads(info["metadata"]["prompt"]) == prompt
    assert json.loads(info["metadata"]["workflow"]) == workflow
    assert not list(video.parent.glob(".*partial*")), "a temporary file was left behind"

    sampler = node_id_of(prompt, "TD_RCMSampler")
    steps = [e for e in result.all("progress") if e["node"] == sampler]
    assert [(e["value"], e["max"]) for e in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_i2v_workflow_writes_the_video(comfy_host, tiny, start_image):
    prompt = i2v_prompt(tiny, start_image, seed=2)
    result = comfy_host.client.run(prompt)
    assert_succeeded(result, comfy_host)
    (video,) = saved_files(result.outputs, comfy_host.base / "output")
    info = probe_video(video)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (9, 64, 48, 16.0)
