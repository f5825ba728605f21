"""ComfyUI's cache, memory management and interrupt with the pack's nodes, in a real server."""

from __future__ import annotations

import threading
import time

import pytest
from comfy_prompts import assert_succeeded, t2v_prompt
from comfy_workflows import node_id_of

pytestmark = pytest.mark.comfy


def _executed_nodes(result) -> set[str]:
    return {e["node"] for e in result.all("executing") if e.get("node") is not None}


def _cached_nodes(result) -> set[str]:
    cached = result.first("execution_cached")
    return set(cached["nodes"]) if cached else set()


def _loaded_models(host) -> list[dict]:
    return host.client.get("/turbodiffusion/models")["loaded"]


def _wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_requeue_reloads_nothing_and_a_new_seed_reruns_only_the_sampler_onwards(comfy_host, tiny):
    prompt = t2v_prompt(tiny, seed=11)
    assert_succeeded(comfy_host.client.run(prompt), comfy_host)

    again = comfy_host.client.run(prompt)
    assert_succeeded(again, comfy_host)
    assert _executed_nodes(again) == set()
    assert _cached_nodes(again) == set(prompt)

    reseeded = comfy_host.client.run(t2v_prompt(tiny, seed=12))
    assert_succeeded(reseeded, comfy_host)
    downstream = {node_id_of(prompt, c) for c in ("TD_RCMSampler", "TD_VAEDecode", "TD_SaveVideo")}
    assert _executed_nodes(reseeded) == downstream
    assert _cached_nodes(reseeded) == set(prompt) - downstream


def test_free_unloads_our_models(comfy_host, tiny):
    assert_succeeded(comfy_host.client.run(t2v_prompt(tiny, seed=21)), comfy_host)
    kinds = {model["kind"] for model in _loaded_models(comfy_host)}
    assert kinds == {"dit", "text_encoder", "vae"}

    comfy_host.client.free(unload_models=True)
    assert _wait_until(lambda: not _loaded_models(comfy_host)), _loaded_models(comfy_host)

    # The cached loader outputs still hold the models: the next run loads them again without re-reading.
    rerun = comfy_host.client.run(t2v_prompt(tiny, seed=22))
    assert_succeeded(rerun, comfy_host)
    assert {model["kind"] for model in _loaded_models(comfy_host)} == {"dit", "vae"}


def test_free_vram_node_unloads_and_reports(comfy_host, tiny):
    prompt = t2v_prompt(tiny, seed=31)
    decode, save = node_id_of(prompt, "TD_VAEDecode"), node_id_of(prompt, "TD_SaveVideo")
    prompt["90"] = {
        "class_type": "TD_FreeVRAM",
        "inputs": {"anything": [decode, 0], "unload_models": True, "empty_cache": True},
    }
    prompt[save]["inputs"]["images"] = ["90", 0]
    result = comfy_host.client.run(prompt)
    assert_succeeded(result, comfy_host)
    (report,) = result.outputs["90"]["text"]
    assert tiny.files["t2v"] in report and tiny.files["vae"] in report
    assert not _loaded_models(comfy_host)
    assert result.outputs[save]["images"], "the frames must pass through to the saver"


def test_interrupt_stops_the_sampler_within_one_step(comfy_host, tiny):
    # 17 frames of 512x512: about a second per step on 2 cores, so the interrupt lands mid-sampling.
    prompt = t2v_prompt(
        tiny,
        seed=41,
        TD_WanModelLoader={"attention": "sdpa"},
        TD_EmptyVideoLatent={"width": 512, "height": 512, "num_frames": 17},
    )
    sampler = node_id_of(prompt, "TD_RCMSampler")
    sent_after: list[int] = []

    def interrupt_after_first_step(event: dict) -> None:
        data = event["data"]
        if event["type"] == "progress" and data.get("node") == sampler and not sent_after:
            sent_after.append(data["value"])
            threading.Thread(target=comfy_host.client.interrupt).start()

    result = comfy_host.client.run(prompt, on_event=interrupt_after_first_step)
    assert result.first("execution_interrupted") is not None, result.status
    assert result.first("execution_interrupted")["node_id"] == sampler
    steps = [e["value"] for e in result.all("progress") if e["node"] == sampler]
    assert sent_after == [1]
    assert max(steps) <= 2, f"the sampler went on for {max(steps) - 1} steps after the interrupt"

    follow_up = comfy_host.client.run(t2v_prompt(tiny, seed=42))
    assert_succeeded(follow_up, comfy_host)
