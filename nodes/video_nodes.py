"""Decoding latents to frames and saving frames as a video file."""

from __future__ import annotations

from pathlib import Path

import comfy.utils
import folder_paths
from comfy import model_management as mm
from comfy.cli_args import args

from .comfy_latent import from_comfy_latent
from .model_patchers import load_to_device
from .video_writer import MAX_CRF, VIDEO_FORMATS, frames_to_uint8, write_video

CATEGORY = "TurboDiffusion"


class TD_VAEDecode:
    DESCRIPTION = "Decodes a Wan video latent to frames with the Wan 2.1 VAE (progress per latent frame)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = (
        "The frames [frames, height, width, 3] in 0..1 (videos of a batch one after another).",
    )
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("TD_WAN_VAE", {"tooltip": "The Wan 2.1 VAE from TD_VAELoader."}),
                "samples": (
                    "LATENT",
                    {"tooltip": "A Wan video latent: TD_RCMSampler, or core nodes with the Wan VAE."},
                ),
            },
            "optional": {
                "tile_size": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 512,
                        "step": 8,
                        "tooltip": "0 decodes whole frames (as TurboDiffusion). Otherwise the side of "
                        "spatial tiles in latent pixels (x8 in the video), blended at the seams: less "
                        "memory, slightly different pixels.",
                    },
                ),
                "vram_budget_gb": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1024.0,
                        "step": 0.5,
                        "tooltip": "Instead of tile_size: GPU memory the decode may use (GB, VAE weights "
                        "included); the fastest plan that fits is chosen, untiled when possible. "
                        "0: no limit.",
                    },
                ),
            },
        }

    def decode(self, vae, samples, tile_size=0, vram_budget_gb=0.0):
        latent = from_comfy_latent(samples)
        load_to_device(vae)
        progress = comfy.utils.ProgressBar(latent.shape[2])
        video = vae.network.decode(
            latent,
            tile_size=tile_size or None,
            callback=lambda done, total: progress.update_absolute(done, total),
            output_device=mm.intermediate_device(),
            vram_budget_gib=vram_budget_gb or None,
        )
        frames = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        return (frames.reshape(-1, *frames.shape[2:]),)


class TD_SaveVideo:
    DESCRIPTION = (
        "Saves frames as a video in ComfyUI's output folder (numbered like core savers), with the prompt and "
        "workflow embedded, and previews it. The file appears only once completely written."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames, e.g. from TD_VAEDecode."}),
                "fps": (
                    "FLOAT",
                    {
                        "default": 16.0,
                        "min": 0.01,
                        "max": 1000.0,
                        "step": 0.01,
                        "tooltip": "Frames per second (TurboDiffusion's models are trained for 16).",
                    },
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "TurboDiffusion",
                        "tooltip": "Name prefix in the output folder; may contain a subfolder (video/name).",
                    },
                ),
                "format": (
                    list(VIDEO_FORMATS),
                    {"default": "mp4", "tooltip": "mp4 (H.264), webm (VP9), animated gif or animated webp."},
                ),
                "crf": (
                    "INT",
                    {
                        "default": 19,
                        "min": 0,
                        "max": max(MAX_CRF.values()),
                        "tooltip": "Quality: lower is better and larger (mp4 0-51, webm 0-63; webp uses "
                        "quality 100 - crf, 0 = lossless; ignored for gif).",
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, fps, filename_prefix, format, crf, prompt=None, extra_pnginfo=None):
        frames = frames_to_uint8(images)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), frames.shape[2], frames.shape[1]
        )
        file = f"{name}_{counter:05}_.{format}"
        metadata = {}
        if not args.disable_metadata:
            metadata.update(extra_pnginfo or {})
            if prompt is not None:
                metadata["prompt"] = prompt
        progress = comfy.utils.ProgressBar(len(frames))
        write_video(
            frames,
            Path(folder) / file,
            fps,
            format,
            crf,
            metadata,
            on_frame=lambda done, total: progress.update_absolute(done, total),
        )
        return {
            "ui": {
                "images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                "animated": [True],
            }
        }
