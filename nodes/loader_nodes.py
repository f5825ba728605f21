"""Loader nodes for the Wan DiT, the umT5 text encoder and the Wan 2.1 VAE, under ComfyUI's memory management.

The loaders read the file onto the offload device and wrap the module in a ModelPatcher; the nodes that use
a model bring it onto the compute device with `load_models_gpu` (so `/free` and ComfyUI's own eviction
manage it like any core model).

Model-file inputs are checked when the node runs, not at queue time (their VALIDATE_INPUTS accepts any
name), so a missing file ends in an execution error that says where the file goes.
"""

from __future__ import annotations

import os

import torch
from comfy import model_management as mm

from .. import wan_models
from ..wan_models.block_swap import enable_block_swap
from ..wan_models.forward_modes import FORWARD_MODES
from ..wan_models.quantize import LINEAR_QUANT_MODES
from .model_files import model_choices, resolve_model_path
from .model_patchers import wrap_module

CATEGORY = "TurboDiffusion"
ATTENTION_BACKENDS = ("sagesla", "sla", "sdpa")
WEIGHT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Compute dtypes TurboDiffusion's models run in, in order of preference where the device supports them.
DIT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
VAE_DTYPES = [torch.bfloat16, torch.float32]
MAX_SWAPPED_BLOCKS = 40  # the blocks of the 14B / A14B models


def _text_encoder_dtype(load_device: torch.device) -> torch.dtype:
    """bf16 as TurboDiffusion (also when a GPU host keeps the encoder on the CPU, to halve its memory);
    fp32 on CPU-only hosts like ComfyUI's other models there, and on GPUs without bf16 (not fp16)."""
    if mm.get_torch_device().type == "cpu":
        return torch.float32
    if load_device.type == "cpu" or mm.should_use_bf16(load_device):
        return torch.bfloat16
    return torch.float32


class TD_WanModelLoader:
    DESCRIPTION = (
        "Loads a TurboDiffusion Wan video DiT from models/diffusion_models: Wan2.1 T2V 1.3B / 14B, or one "
        "expert (high noise or low noise) of Wan2.2 I2V A14B. Reads TurboDiffusion .pth releases (also the "
        "-quant files), original Wan and ComfyUI safetensors."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("TD_WAN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The DiT, managed by ComfyUI (loaded to the GPU when the sampler runs).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (
                    model_choices("diffusion_models"),
                    {"tooltip": "Checkpoint in models/diffusion_models, e.g. TurboWan2.1-T2V-1.3B-480P.pth."},
                ),
                "attention": (
                    list(ATTENTION_BACKENDS),
                    {
                        "default": "sagesla",
                        "tooltip": "Self-attention: sagesla (TurboDiffusion's default, quantised "
                        "sparse-linear), sla (sparse-linear) or sdpa (dense). Falls back where a backend "
                        "cannot run.",
                    },
                ),
                "sla_topk": (
                    "FLOAT",
                    {
                        "default": 0.1,
                        "min": 0.01,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Share of key blocks each query block attends to in sla / sagesla "
                        "(0.1 default, 0.15 for better quality). Ignored by sdpa.",
                    },
                ),
                "weight_dtype": (
                    list(WEIGHT_DTYPES),
                    {
                        "default": "auto",
                        "tooltip": "Compute dtype of the weights; auto picks bf16 on GPUs that support it "
                        "(as TurboDiffusion does) and fp32 on the CPU.",
                    },
                ),
            },
            "optional": {
                "linear_quant": (
                    list(LINEAR_QUANT_MODES),
                    {
                        "default": "auto",
                        "tooltip": "How the block linears are stored: auto as in the file (int8 for -quant "
                        "files), none dense, int8 TurboDiffusion's -quant format (half the memory of bf16), "
                        "fp8 e4m3 per-channel, int8_rowwise int8 with one scale per output channel and per "
                        "token: the fast int8 path on Hopper / Ada GPUs, but it changes the numbers against "
                        "the -quant reference (a -quant file is re-quantised per row; a layer that loses too "
                        "much is refused). Converted layer by layer while loading.",
                    },
                ),
                "swap_blocks": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SWAPPED_BLOCKS,
                        "tooltip": "For small GPUs: keep the last N transformer blocks in CPU memory and "
                        "stream them in during each step (same output, slower). 0 keeps the whole model on "
                        "the GPU.",
                    },
                ),
                "forward_mode": (
                    list(FORWARD_MODES),
                    {
                        "default": "none",
                        "tooltip": "none: plain execution. cudagraphs: each video size's first step is "
                        "captured and later steps replay it (less overhead per step; keeps one step's "
                        "activations reserved, ~1.4 GB for 1.3B at 480p, ~11 GB for 14B at 720p; not with "
                        "swap_blocks). default / max-autotune: torch.compile the blocks (the first run "
                        "compiles for minutes). Falls back to plain execution where unavailable.",
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return True

    def load(
        self,
        model_name,
        attention,
        sla_topk,
        weight_dtype,
        linear_quant="auto",
        swap_blocks=0,
        forward_mode="none",
    ):
        path = resolve_model_path("diffusion_models", model_name, "TD_WanModelLoader")
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        dtype = WEIGHT_DTYPES[weight_dtype] or mm.unet_dtype(load_device, supported_dtypes=DIT_DTYPES)
        model = wan_models.load_dit(
            path,
            device=offload_device,
            dtype=dtype,
            attention=attention,
            sla_topk=sla_topk,
            linear_quant=linear_quant,
            quantize_device=load_device,
            forward_mode=forward_mode,
        )
        if swap_blocks:
            # The widget's maximum fits the largest model; a smaller one swaps all of its blocks.
            enable_block_swap(model, min(swap_blocks, model.config.num_layers))
        return (wrap_module(model, load_device, offload_device, os.path.basename(path), "dit"),)


class TD_TextEncoderLoader:
    DESCRIPTION = (
        "Loads the umT5-XXL text encoder of Wan from models/text_encoders: ComfyUI's umt5_xxl_*.safetensors "
        "(tokenizer included) or the original models_t5_umt5-xxl-enc-bf16.pth."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("TD_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The umT5 encoder, managed by ComfyUI; connect it to TD_TextEncode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (
                    model_choices("text_encoders"),
                    {"tooltip": "Encoder in models/text_encoders, e.g. umt5_xxl_fp16.safetensors."},
                ),
                "device": (
                    ["default", "cpu"],
                    {
                        "default": "default",
                        "tooltip": "default: where ComfyUI runs text encoders (the GPU when there is room); "
                        "cpu: keep the 11 GB encoder off the GPU (slower prompt encoding).",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, text_encoder_name):
        return True

    def load(self, text_encoder_name, device):
        path = resolve_model_path("text_encoders", text_encoder_name, "TD_TextEncoderLoader")
        load_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_device()
        offload_device = mm.text_encoder_offload_device()
        dtype = _text_encoder_dtype(load_device)
        encoder = wan_models.load_text_encoder(path, device=offload_device, dtype=dtype)
        return (wrap_module(encoder, load_device, offload_device, os.path.basename(path), "text_encoder"),)


class TD_VAELoader:
    DESCRIPTION = (
        "Loads the Wan 2.1 VAE (used by Wan2.1 and the Wan2.2 A14B models) from models/vae: Wan2.1_VAE.pth "
        "or ComfyUI's wan_2.1_vae.safetensors."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("TD_WAN_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, managed by ComfyUI; connect it to TD_VAEDecode / TD_ImageToVideo.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (
                    model_choices("vae"),
                    {"tooltip": "VAE in models/vae, e.g. Wan2.1_VAE.pth or wan_2.1_vae.safetensors."},
                )
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name):
        return True

    def load(self, vae_name):
        path = resolve_model_path("vae", vae_name, "TD_VAELoader")
        load_device, offload_device = mm.vae_device(), mm.vae_offload_device()
        dtype = mm.vae_dtype(load_device, allowed_dtypes=VAE_DTYPES)
        vae = wan_models.load_vae(path, device=offload_device, dtype=dtype)
        return (wrap_module(vae, load_device, offload_device, os.path.basename(path), "vae"),)
