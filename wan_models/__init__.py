"""Wan2.1 / Wan2.2 models for TurboDiffusion: DiT, VAE, umT5 text encoder, loaders and sampling.

Public API: `load_dit`, `load_vae`, `load_text_encoder`, `rcm_sample`, `generate_t2v`, `generate_i2v`
(see the README). Names resolve lazily so that importing one part does not import them all.
"""

from importlib import import_module

from .checkpoint_io import CheckpointError, read_state_dict

_LAZY = {
    "WanDiTConfig": ".config",
    "WAN_PRESETS": ".config",
    "config_from_state_dict": ".config",
    "WanDiT": ".dit",
    "load_dit": ".dit_loader",
    "dit_from_state_dict": ".dit_loader",
    "make_block_ops": ".block_ops",
    "set_forward_mode": ".forward_modes",
    "FORWARD_MODES": ".forward_modes",
    "VideoFileWriter": ".video_file",
    "BackgroundVideoWriter": ".video_file",
    "video_to_uint8": ".video_file",
    "detect_dit_layout": ".dit_loader",
    "require_kind": ".dit_loader",
    "DiTLayout": ".dit_loader",
    "WanVAE": ".vae",
    "load_vae": ".vae_loader",
    "UMT5TextEncoder": ".text_encoder",
    "load_text_encoder": ".text_encoder",
    "pad_context_to_512": ".text_encoder",
    "enable_block_swap": ".block_swap",
    "plan_block_swap": ".block_swap",
    "MemoryBudgetError": ".block_swap",
    "set_linear_activations": ".linear_layers",
    "make_self_attention": ".attention",
    "sdpa_attention": ".attention",
    "rcm_sample": ".sampler",
    "rcm_time_grid": ".sampler",
    "SamplingStats": ".sampler",
    "GenerationResult": ".pipeline",
    "preset_size": ".resolution",
    "adaptive_size": ".resolution",
    "validate_num_frames": ".resolution",
    "generate_t2v": ".pipeline",
    "generate_i2v": ".pipeline",
}

__all__ = ["CheckpointError", "read_state_dict", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
