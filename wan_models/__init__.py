"""Wan2.1 / Wan2.2 models for TurboDiffusion: DiT, VAE, umT5 text encoder, loaders and sampling.

Public API (filled in by the modules below as they land): `load_dit`, `load_vae`,
`load_text_encoder`, `rcm_sample`, `generate_t2v`, `generate_i2v`.
"""

from .checkpoint_io import CheckpointError, read_state_dict

__all__ = ["CheckpointError", "read_state_dict"]
