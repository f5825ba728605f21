"""ComfyUI's fp8 checkpoint formats, turned back into plain floating tensors.

Model-agnostic: the Wan DiT loader and the umT5 text-encoder loader both use it (FORMATS.md §1.6).

* plain fp8 (`*_fp8_e4m3fn.safetensors`): fp8 tensors, no scales; the value is used as stored.
* legacy "scaled fp8" (`*_fp8_scaled.safetensors`): a `scaled_fp8` marker tensor, and per quantised
  Linear a 0-d float32 `<layer>.scale_weight` (optionally `<layer>.scale_input`); W = weight × scale_weight.
* current ComfyUI quantisation: `<layer>.weight_scale`, described by `<layer>.comfy_quant` (the UTF-8
  bytes of a JSON object as a uint8 tensor) or by the file metadata `_quantization_metadata`
  (`{"layers": {layer: {"format": ...}}}`); W = weight × weight_scale for the fp8 formats.

Tensors that are not fp8 (biases, norms, a tokenizer blob) keep their stored dtype; markers, input scales
and format descriptions are dropped, because a plain floating model has no use for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from .checkpoint_io import CheckpointError

FP8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
FP8_FORMAT_NAMES = frozenset({"float8_e4m3fn", "float8_e5m2"})
SCALED_FP8_MARKER = "scaled_fp8"
QUANTIZATION_METADATA_KEY = "_quantization_metadata"
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
# NVFP4 and similar block formats carry a second scale; they are not fp8 and are refused.
UNSUPPORTED_SUFFIXES = (".weight_scale_2",)


def is_fp8_auxiliary_key(key: str) -> bool:
    """True for the keys that describe fp8 quantisation rather than hold model weights."""
    return key == SCALED_FP8_MARKER or key.endswith(
        ("." + SCALED_FP8_MARKER, *WEIGHT_SCALE_SUFFIXES, *DROPPED_SUFFIXES, *UNSUPPORTED_SUFFIXES)
    )


def has_comfy_fp8(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bool:
    """Whether a state dict (real or meta tensors) uses one of ComfyUI's fp8 formats."""
    if metadata and QUANTIZATION_METADATA_KEY in metadata:
        return True
    return any(tensor.dtype in FP8_DTYPES or is_fp8_auxiliary_key(key) for key, tensor in state.items())


def dequantize_comfy_fp8(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A copy of `state` with every fp8 tensor dequantised to `dtype` and the format keys removed."""
    layer_formats = _layer_formats(state, metadata)
    for layer, layer_format in layer_formats.items():
        if layer_format not in FP8_FORMAT_NAMES:
            raise CheckpointError(
                f"layer {layer!r} is stored in the ComfyUI quantisation format {layer_format!r}, which is "
                f"not supported; use an fp16, bf16 or fp8 version of the file"
            )
    unsupported = [key for key in state if key.endswith(UNSUPPORTED_SUFFIXES)]
    if unsupported:
        raise CheckpointError(
            f"{unsupported[0]!r} belongs to a block-scaled (e.g. NVFP4) quantisation that is not supported; "
            f"use an fp16, bf16 or fp8 version of the file"
        )

    result: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if is_fp8_auxiliary_key(key):
            continue
        scale = _weight_scale(state, key)
        if scale is not None:
            result[key] = (tensor.to(torch.float32) * scale).to(dtype)
        elif tensor.dtype in FP8_DTYPES:
            result[key] = tensor.to(dtype)
        else:
            result[key] = tensor
    return result


def _weight_scale(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor | None:
    if not key.endswith(".weight"):
        return None
    layer = key[: -len(".weight")]
    for suffix in WEIGHT_SCALE_SUFFIXES:
        scale = state.get(layer + suffix)
        if scale is None:
            continue
        if scale.numel() != 1:
            raise CheckpointError(
                f"{layer + suffix!r} has shape {tuple(scale.shape)}; only per-tensor fp8 scales "
                f"(one number per weight) are supported"
            )
        return scale.reshape(()).to(device=state[key].device, dtype=torch.float32)
    return None


def _layer_formats(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Quantisation format per layer, from the file metadata and the `.comfy_quant` tensors."""
    formats: dict[str, str] = {}
    if metadata and QUANTIZATION_METADATA_KEY in metadata:
        try:
            layers = json.loads(metadata[QUANTIZATION_METADATA_KEY])["layers"]
            formats.update({name: str(entry.get("format")) for name, entry in layers.items()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"the file metadata {QUANTIZATION_METADATA_KEY!r} is not a JSON object with a 'layers' map"
            ) from error
    for key, tensor in state.items():
        if key.endswith(".comfy_quant"):
            layer = key[: -len(".comfy_quant")]
            try:
                formats[layer] = str(json.loads(bytes(tensor.cpu().tolist()).decode("utf-8")).get("format"))
            except (ValueError, AttributeError) as error:
                raise CheckpointError(f"{key!r} does not hold a JSON quantisation description") from error
    return formats
