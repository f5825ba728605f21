"""ComfyUI node classes of the pack (thin wrappers over `wan_models`)."""

from .conditioning_nodes import TD_EmptyVideoLatent, TD_ImageToVideo, TD_TextEncode
from .loader_nodes import TD_TextEncoderLoader, TD_VAELoader, TD_WanModelLoader
from .memory_nodes import TD_FreeVRAM
from .routes import register_routes
from .sampler_node import TD_RCMSampler
from .video_nodes import TD_DecodeAndSaveVideo, TD_SaveVideo, TD_VAEDecode

NODE_CLASS_MAPPINGS = {
    "TD_WanModelLoader": TD_WanModelLoader,
    "TD_TextEncoderLoader": TD_TextEncoderLoader,
    "TD_TextEncode": TD_TextEncode,
    "TD_VAELoader": TD_VAELoader,
    "TD_EmptyVideoLatent": TD_EmptyVideoLatent,
    "TD_ImageToVideo": TD_ImageToVideo,
    "TD_RCMSampler": TD_RCMSampler,
    "TD_VAEDecode": TD_VAEDecode,
    "TD_SaveVideo": TD_SaveVideo,
    "TD_DecodeAndSaveVideo": TD_DecodeAndSaveVideo,
    "TD_FreeVRAM": TD_FreeVRAM,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TD_WanModelLoader": "TurboDiffusion Wan Model Loader",
    "TD_TextEncoderLoader": "TurboDiffusion Text Encoder Loader",
    "TD_TextEncode": "TurboDiffusion Text Encode",
    "TD_VAELoader": "TurboDiffusion VAE Loader",
    "TD_EmptyVideoLatent": "TurboDiffusion Empty Video Latent",
    "TD_ImageToVideo": "TurboDiffusion Image to Video",
    "TD_RCMSampler": "TurboDiffusion rCM Sampler",
    "TD_VAEDecode": "TurboDiffusion VAE Decode",
    "TD_SaveVideo": "TurboDiffusion Save Video",
    "TD_DecodeAndSaveVideo": "TurboDiffusion Decode and Save Video",
    "TD_FreeVRAM": "TurboDiffusion Free VRAM",
}

register_routes()
