"""Decoding latents to frames, saving frames as a video file, and both at once with the video encoded while
the VAE decodes."""

from __future__ import annotations

from pathlib import Path

import comfy.utils
import folder_paths
from comfy import model_management as mm
from comfy.cli_args import args

from ..wan_models.video_file import BACKGROUND_PRESET, PYAV_CODECS, background_writer
from .comfy_latent import from_comfy_latent
from .model_patchers import load_to_device
from .stage_timing import log_stage, synchronised_now, timed_stage
from .video_writer import MAX_CRF, VIDEO_FORMATS, frames_to_uint8, write_video

CATEGORY = "TurboDiffusion"
VRAM_BUDGET_INPUT = (
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
)
FPS_INPUT = (
    "FLOAT",
    {
        "default": 16.0,
        "min": 0.01,
        "max": 1000.0,
        "step": 0.01,
        "tooltip": "Frames per second (TurboDiffusion's models are trained for 16).",
    },
)
FILENAME_PREFIX_INPUT = (
    "STRING",
    {
        "default": "TurboDiffusion",
        "tooltip": "Name prefix in the output folder; may contain a subfolder (video/name).",
    },
)


def _output_file(filename_prefix: str, video_format: str, width: int, height: int) -> tuple[Path, dict]:
    """The next numbered file in ComfyUI's output folder, and its UI preview entry."""
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width, height
    )
    file = f"{name}_{counter:05}_.{video_format}"
    return Path(folder) / file, {"filename": file, "subfolder": subfolder, "type": "output"}


def _metadata(prompt, extra_pnginfo) -> dict:
    metadata = {}
    if not args.disable_metadata:
        metadata.update(extra_pnginfo or {})
        if prompt is not None:
            metadata["prompt"] = prompt
    return metadata


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
                "vram_budget_gb": VRAM_BUDGET_INPUT,
            },
        }

    def decode(self, vae, samples, tile_size=0, vram_budget_gb=0.0):
        latent = from_comfy_latent(samples)
        load_to_device(vae)
        progress = comfy.utils.ProgressBar(latent.shape[2])
        with timed_stage("VAE decoding", vae.load_device):
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
                "fps": FPS_INPUT,
                "filename_prefix": FILENAME_PREFIX_INPUT,
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
        start = synchronised_now()
        frames = frames_to_uint8(images)
        path, preview = _output_file(filename_prefix, format, frames.shape[2], frames.shape[1])
        progress = comfy.utils.ProgressBar(len(frames))
        write_video(
            frames,
            path,
            fps,
            format,
            crf,
            _metadata(prompt, extra_pnginfo),
            on_frame=lambda done, total: progress.update_absolute(done, total),
        )
        log_stage("video encoding", synchronised_now() - start, f"{len(frames)} frames, {format}")
        return {"ui": {"images": [preview], "animated": [True]}}


class TD_DecodeAndSaveVideo:
    DESCRIPTION = (
        "Decodes a Wan video latent and writes the video while decoding, so the file is ready moments after "
        "the last frame (faster than TD_VAEDecode followed by TD_SaveVideo). Numbered in the output folder, "
        "with the prompt and workflow embedded, and previewed."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("TD_WAN_VAE", {"tooltip": "The Wan 2.1 VAE from TD_VAELoader."}),
                "samples": ("LATENT", {"tooltip": "A Wan video latent, e.g. from TD_RCMSampler."}),
                "fps": FPS_INPUT,
                "filename_prefix": FILENAME_PREFIX_INPUT,
                "format": (
                    list(PYAV_CODECS),
                    {"default": "mp4", "tooltip": "mp4 (H.264) or webm (VP9)."},
                ),
                "crf": (
                    "INT",
                    {
                        "default": 19,
                        "min": 0,
                        "max": max(MAX_CRF[f] for f in PYAV_CODECS),
                        "tooltip": "Quality: lower is better and larger (mp4 0-51, webm 0-63). mp4 uses "
                        f"x264's {BACKGROUND_PRESET} preset to keep up with the decoder.",
                    },
                ),
            },
            "optional": {"vram_budget_gb": VRAM_BUDGET_INPUT},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(
        self,
        vae,
        samples,
        fps,
        filename_prefix,
        format,
        crf,
        vram_budget_gb=0.0,
        prompt=None,
        extra_pnginfo=None,
    ):
        latent = from_comfy_latent(samples)
        load_to_device(vae)
        batch, _, _, height, width = latent.shape
        path, preview = _output_file(filename_prefix, format, batch * width * 8, height * 8)
        encoder = background_writer(path, fps, format, crf, _metadata(prompt, extra_pnginfo))
        progress = comfy.utils.ProgressBar(latent.shape[2])
        with encoder.aborted_on_error(), timed_stage("VAE decoding (encoding alongside)", vae.load_device):
            vae.network.decode(
                latent,
                callback=lambda done, total: progress.update_absolute(done, total),
                vram_budget_gib=vram_budget_gb or None,
                on_chunk=encoder.add,
            )
        with timed_stage("video encoding (after decoding)"):
            encoder.finish()
        return {"ui": {"images": [preview], "animated": [True]}}
