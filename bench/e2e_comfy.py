"""Part (c) of bench/e2e.py: the whole text-to-video job queued to ComfyUI, from the prompt to the MP4 file.

ComfyUI runs in this process: the prompt is validated and executed by ComfyUI's own `execution` module, as
its server's queue worker does (`validate_prompt`, then `PromptExecutor.execute`), with this pack's nodes
registered as a custom-node folder would register them. Nothing goes over HTTP, so the ComfyUI front-end and
server packages need not travel to the GPU; the timed span is queue-in to MP4-on-disk.

The checkpoints are written in their real formats with random weights: the TurboDiffusion `.pth` DiT, the
Wan2.1 VAE `.pth`, and ComfyUI's umT5-XXL safetensors with a SentencePiece tokenizer inside (trained here on a
few prompts; the real vocabulary is not needed for random weights).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import re
import sys
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))  # the tiny-model helpers shared with the tests

from sentencepiece_model import train_unigram_tokenizer  # noqa: E402

TIMING_LINE = re.compile(r"TurboDiffusion timing: (.+) ([0-9.]+) s(?: \((.*)\))?$")
TOKENIZER_TEXT = (
    "A red fox runs through a snowy forest at dawn, cinematic lighting, shallow depth of field.",
    "Two astronauts float inside a space station, Earth glowing through the round window.",
    "The camera pans over a busy market street at night, neon signs reflect in puddles.",
    "Slow motion: a hummingbird hovers near a purple flower, ultra detailed, sharp focus.",
)
FILE_NAMES = {
    "dit": "TurboWan2.1-T2V-random.pth",
    "vae": "Wan2.1_VAE_random.pth",
    "text_encoder": "umt5_xxl_random.safetensors",
}
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)
UMT5_TINY = dict(vocab_size=512, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)  # text_dim 64


class QuietServer:
    """What `PromptExecutor` needs of ComfyUI's server when nobody listens."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None) -> None:
        """No websocket clients."""


class StageTimings(logging.Handler):
    """Collects the pack's `TurboDiffusion timing:` log lines of one run."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stages: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = TIMING_LINE.match(record.getMessage())
        if line:
            stage, seconds, detail = line.groups()
            self.stages.append((stage + (f" ({detail})" if detail else ""), float(seconds)))


def tokenizer_bytes() -> bytes:
    return train_unigram_tokenizer([f"{text} {i}" for i in range(30) for text in TOKENIZER_TEXT], 300)


def write_text_encoder(path: Path, shape: dict, device: str, seed: int = 1) -> None:
    """ComfyUI's umt5 safetensors: transformers names, bf16, every tensor random, the tokenizer inside."""
    from comfyui_turbodiffusion.wan_models.text_encoder import TIED_EMBEDDING_KEY, build_umt5_encoder
    from safetensors.torch import save_file
    from transformers import UMT5Config

    config = UMT5Config(**shape, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, tensor in build_umt5_encoder(config).state_dict().items():
        if name == TIED_EMBEDDING_KEY:
            continue
        values = torch.randn(tensor.shape, generator=generator, device=device)
        if name.endswith("layer_norm.weight"):
            values = 1 + 0.2 * (2 * torch.rand(tensor.shape, generator=generator, device=device) - 1)
        elif "relative_attention_bias" in name:
            values = 0.5 * values
        elif name != "shared.weight":
            values = values / math.sqrt(tensor.shape[1])
        state[name] = values.to(torch.bfloat16).cpu()
    state["spiece_model"] = torch.frombuffer(bytearray(tokenizer_bytes()), dtype=torch.uint8)
    save_file(state, str(path))


def write_vae(path: Path, base_dim: int, device: str, seed: int = 2) -> None:
    """`Wan2.1_VAE.pth` layout, float32, every tensor random (conv weights N(0, 1/fan_in), gammas 1 ± 0.2)."""
    from comfyui_turbodiffusion.wan_models.vae import WanVAE

    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in WanVAE(base_dim).state_dict().items()}
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("gamma"):
            values = 1 + 0.2 * (2 * torch.rand(shape, generator=generator, device=device) - 1)
        elif name.endswith("bias"):
            values = 0.05 * torch.randn(shape, generator=generator, device=device)
        else:
            values = torch.randn(shape, generator=generator, device=device) / math.sqrt(math.prod(shape[1:]))
        state[name] = (0.3 * values if name.startswith("decoder.head.2") else values).cpu()
    torch.save(state, path)


def guard_torchvision() -> None:
    """Let a torchvision built for another torch import (tools/comfy_launch.py); no effect where it matches.
    Call before anything imports transformers or ComfyUI."""
    _load_tool("comfy_launch").install_guard()


def start_comfyui(comfy_dir: Path, base: Path, cpu: bool):
    """ComfyUI's `execution` module with this pack registered; models and outputs under `base`."""
    guard_torchvision()
    if str(comfy_dir) not in sys.path:
        sys.path.append(str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import folder_paths

    for folder in ("diffusion_models", "text_encoders", "vae"):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(base / "models" / folder), is_default=True)
    (base / "output").mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(base / "output"))
    import execution
    from comfyui_turbodiffusion import nodes as pack

    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(pack.NODE_CLASS_MAPPINGS)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update(pack.NODE_DISPLAY_NAME_MAPPINGS)
    return execution


def _load_tool(name: str):
    """A module of tools/ (not a package), kept in sys.modules: the guard's import hook lives on in it."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def t2v_prompt(text: str, seed: int, size: tuple[int, int], frames: int, forward_mode: str) -> dict:
    """The text-to-video job in ComfyUI's API format, ending in TD_DecodeAndSaveVideo."""
    width, height = size
    return {
        "1": {
            "class_type": "TD_WanModelLoader",
            "inputs": {
                "model_name": FILE_NAMES["dit"],
                "attention": "sagesla",
                "sla_topk": 0.1,
                "weight_dtype": "auto",
                "linear_quant": "auto",
                "swap_blocks": 0,
                "forward_mode": forward_mode,
            },
        },
        "2": {
            "class_type": "TD_TextEncoderLoader",
            "inputs": {"text_encoder_name": FILE_NAMES["text_encoder"], "device": "default"},
        },
        "3": {"class_type": "TD_VAELoader", "inputs": {"vae_name": FILE_NAMES["vae"]}},
        "4": {"class_type": "TD_TextEncode", "inputs": {"text_encoder": ["2", 0], "text": text}},
        "5": {
            "class_type": "TD_EmptyVideoLatent",
            "inputs": {
                "resolution": "480p",
                "aspect_ratio": "16:9",
                "num_frames": frames,
                "batch_size": 1,
                "width": width,
                "height": height,
            },
        },
        "6": {
            "class_type": "TD_RCMSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["4", 0],
                "latent": ["5", 0],
                "seed": seed,
                "steps": 4,
                "sigma_max": 80.0,
                "mode": "sde",
            },
        },
        "7": {
            "class_type": "TD_DecodeAndSaveVideo",
            "inputs": {
                "vae": ["3", 0],
                "samples": ["6", 0],
                "fps": 16.0,
                "filename_prefix": "e2e/TurboDiffusion",
                "format": "mp4",
                "crf": 19,
            },
        },
    }


def queue(execution, executor, prompt: dict, base: Path) -> dict:
    """Validate and execute one prompt; seconds from queue-in to the MP4 on disk, and the pack's stages."""
    from comfyui_turbodiffusion.nodes import stage_timing

    timings = StageTimings()
    stage_timing.logger.addHandler(timings)
    stage_timing.logger.setLevel(logging.INFO)
    prompt_id = str(uuid.uuid4())
    try:
        start = time.perf_counter()
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise RuntimeError(f"ComfyUI refused the prompt: {error} {node_errors}")
        executor.execute(prompt, prompt_id, {}, outputs)
        seconds = time.perf_counter() - start
    finally:
        stage_timing.logger.removeHandler(timings)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        raise RuntimeError(
            "ComfyUI execution failed: "
            + "; ".join(f"{e['node_type']}: {e['exception_message'].strip()}" for e in errors)
        )
    preview = executor.history_result["outputs"]["7"]["images"][0]
    video = base / "output" / preview["subfolder"] / preview["filename"]
    return {"seconds": seconds, "video": video, "stages": timings.stages}
