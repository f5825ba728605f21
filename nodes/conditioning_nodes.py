"""Prompt, empty-latent and image-to-video nodes."""

from __future__ import annotations

import torch
from comfy import model_management as mm

from ..wan_models import i2v
from ..wan_models.resolution import (
    ASPECT_RATIOS,
    DEFAULT_NUM_FRAMES,
    RESOLUTIONS,
    adaptive_size,
    latent_shape,
    preset_size,
    validate_num_frames,
)
from .comfy_conditioning import text_conditioning, with_start_image
from .model_patchers import load_to_device
from .stage_timing import timed_stage

CATEGORY = "TurboDiffusion"
# The two presets TurboDiffusion's models are trained for come first.
RESOLUTION_CHOICES = ["480p", "720p", *(r for r in RESOLUTIONS if r not in ("480p", "720p"))]
MAX_FRAMES = 1025
MAX_SIZE = 4096


def _size_inputs() -> dict:
    """Optional width/height that override the preset (0 keeps it)."""
    return {
        name: (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": MAX_SIZE,
                "step": 16,
                "tooltip": f"Custom {name} in pixels, a multiple of 16; 0 uses the resolution preset.",
            },
        )
        for name in ("width", "height")
    }


def _num_frames_input(tooltip_extra: str = "") -> tuple:
    return (
        "INT",
        {
            "default": DEFAULT_NUM_FRAMES,
            "min": 1,
            "max": MAX_FRAMES,
            "step": 4,
            "tooltip": "Frames to generate, of the form 4n+1 (81 = 5 s at 16 fps)." + tooltip_extra,
        },
    )


def _resolution_inputs(default: str) -> dict:
    return {
        "resolution": (
            RESOLUTION_CHOICES,
            {
                "default": default,
                "tooltip": "TurboDiffusion size preset (480p: 832x480 at 16:9, 720p: 1280x720).",
            },
        ),
        "aspect_ratio": (list(ASPECT_RATIOS), {"default": "16:9", "tooltip": "Aspect ratio of the preset."}),
    }


def _override(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    return (width or size[0], height or size[1])


class TD_TextEncode:
    DESCRIPTION = (
        "Encodes a prompt with the umT5 text encoder into Wan conditioning (512 tokens, zero-padded)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Text conditioning for TD_RCMSampler (or TD_ImageToVideo).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("TD_TEXT_ENCODER", {"tooltip": "The encoder from TD_TextEncoderLoader."}),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The prompt. The models were distilled on long, detailed English prompts.",
                    },
                ),
            }
        }

    def encode(self, text_encoder, text):
        load_to_device(text_encoder)
        with timed_stage("text encoding", text_encoder.load_device):
            context = text_encoder.network.encode([text])
        return (text_conditioning(context.to(mm.intermediate_device(), torch.float32)),)


class TD_EmptyVideoLatent:
    DESCRIPTION = "An empty Wan video latent of a TurboDiffusion resolution preset, for text-to-video."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros [batch, 16, 1 + (frames - 1) / 4, height / 8, width / 8].",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_resolution_inputs("480p"),
                "num_frames": _num_frames_input(),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos per run."}),
            },
            "optional": _size_inputs(),
        }

    def create(self, resolution, aspect_ratio, num_frames, batch_size, width=0, height=0):
        validate_num_frames(num_frames)
        video_width, video_height = _override(preset_size(resolution, aspect_ratio), width, height)
        shape = latent_shape(video_width, video_height, num_frames, batch_size)
        return ({"samples": torch.zeros(shape, device=mm.intermediate_device())},)


class TD_ImageToVideo:
    DESCRIPTION = (
        "Image-to-video conditioning for Wan2.2 I2V A14B: encodes the start image (followed by grey frames) "
        "with the VAE and attaches it to the prompt; also makes the matching empty latent."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "latent")
    OUTPUT_TOOLTIPS = (
        "The prompt with the start image attached (connect to TD_RCMSampler's positive).",
        "The empty latent of the video size (connect to TD_RCMSampler's latent).",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("TD_WAN_VAE", {"tooltip": "The Wan 2.1 VAE from TD_VAELoader."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt from TD_TextEncode or CLIPTextEncode."}),
                "start_image": (
                    "IMAGE",
                    {"tooltip": "The first frame of the video (the first image of a batch)."},
                ),
                **_resolution_inputs("720p"),
                "adaptive_resolution": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Keep the preset's pixel area but follow the image's aspect ratio "
                        "(sides rounded to multiples of 16); off: use the preset size, stretching the image.",
                    },
                ),
                "num_frames": _num_frames_input(),
            },
            "optional": {
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos per run."}),
                **_size_inputs(),
            },
        }

    def encode(
        self,
        vae,
        positive,
        start_image,
        resolution,
        aspect_ratio,
        adaptive_resolution,
        num_frames,
        batch_size=1,
        width=0,
        height=0,
    ):
        validate_num_frames(num_frames)
        image = start_image[0]
        if adaptive_resolution:
            size = adaptive_size(image.shape[1], image.shape[0], resolution, aspect_ratio)
        else:
            size = preset_size(resolution, aspect_ratio)
        video_width, video_height = _override(size, width, height)
        pixels = i2v.preprocess_image(image, video_width, video_height)
        load_to_device(vae)
        condition = i2v.build_i2v_condition(vae.network, pixels, num_frames).to(mm.intermediate_device())
        shape = latent_shape(video_width, video_height, num_frames, batch_size)
        latent = {"samples": torch.zeros(shape, device=mm.intermediate_device())}
        return (with_start_image(positive, condition), latent)
