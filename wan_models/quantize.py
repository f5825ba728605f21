"""Changing how the block linears of a Wan DiT are stored: dense, int8 or fp8 (issue 6, "quantise at load").

* int8: exactly TurboDiffusion's `-quant` format (TURBODIFFUSION.md §3.1, §11.1): `int8_weight` + one float32
  `scale` per 128×128 tile, made with the same quantiser the reference uses for weights and activations.
  Quantising a bf16 checkpoint therefore gives bit for bit the tensors of a `-quant` file made from it.
* fp8: float8_e4m3fn `weight` + one float32 `weight_scale` per output channel (`turbo_kernels.fp8_linear`).
* int8_rowwise (opt-in, KERNELS.md §4.6 "fast path"): int8 `weight` + one float32 `weight_scale` per output
  channel, s_n = max_k|w_n| / 127 (`turbo_kernels.rowwise_gemm.quantize_rows_int8`). Other numerics than
  `-quant`: from a `-quant` file each weight is dequantised from its tiles and re-quantised per row
  (`requantize_tiles_to_rows`); a layer whose worst 128×128 tile moves by more than
  `MAX_ROWWISE_TILE_ERROR` (rel-L2) is refused, naming it.
* dense: `weight` in the compute dtype (int8 / fp8 weights are dequantised).

Layers are converted one at a time: each weight is moved to the work device (the GPU when there is one, so
the arithmetic is fast), converted, moved to its storage device, and the original is dropped before the
next layer starts; peak memory is the model plus one layer, never two copies of the model. The bias and
every tensor outside the block linears are left alone.

ComfyUI's e4m3 fp8 files (FORMATS.md §1.6) can keep their block-linear weights as stored
(`split_stored_fp8_linears`): the per-tensor scale becomes a per-channel `weight_scale` of equal values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

from ..turbo_kernels.fp8_linear import quantize_rows_e4m3
from ..turbo_kernels.w8a8_reference import dequantize_tiles, quantize_tiles
from .checkpoint_io import CheckpointError
from .linear_layers import QUANTISED_LINEARS, Fp8Linear, Int8Linear, Int8RowwiseLinear

logger = logging.getLogger(__name__)

LINEAR_QUANT_MODES = ("auto", "none", "int8", "fp8", "int8_rowwise")
# Re-quantising -quant tiles to rows moves Gaussian-like tiles by 0.008-0.0095 (rel-L2, the worst tile of
# each Wan-shaped layer, bench/RESULTS.md), about one more int8 rounding. 0.05 is five times that and above
# the whole-layer error of the fp8 path (0.037): a tile past it lost more to the re-quantisation than fp8
# loses, because one much larger tile sets its rows' scales (tests/test_rowwise_gemm_reference.py: > 0.5).
MAX_ROWWISE_TILE_ERROR = 0.05
# The weight of a linear inside a block (original / ComfyUI names, any prefix), as a stored key.
BLOCK_LINEAR_WEIGHT = re.compile(
    r"(?:^|\.)blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])\.weight$"
)
COMFY_FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
WRAPPER_SEGMENT = "_checkpoint_wrapped_module."
STORAGE_KINDS = ("dense", "int8", "fp8", "int8_rowwise")
# Key suffixes each storage kind uses for a linear's weight (the bias keeps its own key in every kind).
WEIGHT_KEYS = {
    "dense": ("weight",),
    "int8": ("int8_weight", "scale"),
    "fp8": ("weight", "weight_scale"),
    "int8_rowwise": ("weight", "weight_scale"),
}
LAYER_CLASSES = {"int8": Int8Linear, "fp8": Fp8Linear, "int8_rowwise": Int8RowwiseLinear}


def target_storage(linear_quant: str, stored: str) -> str:
    """The storage kind a `linear_quant` option asks for, given what the file holds ("auto" = as stored)."""
    if linear_quant not in LINEAR_QUANT_MODES:
        raise ValueError(f"linear_quant must be one of {LINEAR_QUANT_MODES}, got {linear_quant!r}")
    if linear_quant == "auto":
        return stored
    return "dense" if linear_quant == "none" else linear_quant


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the int8 / fp8 linears of a model (e.g. `blocks.0.self_attn.q`)."""
    return [name for name, module in model.named_modules() if isinstance(module, QUANTISED_LINEARS)]


def convert_linear_weights_(
    weights: MutableMapping[str, torch.Tensor],
    names: list[str],
    stored: str,
    target: str,
    work_device: torch.device,
    device: torch.device,
) -> None:
    """Rewrite the weights of the linears `names` in a state dict from `stored` to `target` storage, in place
    and one layer at a time; results land on `device`, the arithmetic runs on `work_device`. int8 tiles to
    int8_rowwise re-quantise each weight (`requantize_tiles_to_rows`), log the worst layer and raise
    CheckpointError naming a layer past `MAX_ROWWISE_TILE_ERROR`."""
    for kind in (stored, target):
        if kind not in STORAGE_KINDS:
            raise ValueError(f"storage must be one of {STORAGE_KINDS}, got {kind!r}")
    worst = (0.0, "")
    for name in names:
        stored_tensors = [weights.pop(f"{name}.{key}").to(work_device) for key in WEIGHT_KEYS[stored]]
        if stored == "int8" and target == "int8_rowwise":
            converted, tile_error = _rows_from_tiles(name, *stored_tensors)
            worst = max(worst, (tile_error, name))
        else:
            converted = _store(target, _dense_weight(stored, *stored_tensors))
        del stored_tensors
        for key, tensor in zip(WEIGHT_KEYS[target], converted):
            weights[f"{name}.{key}"] = tensor.to(device)
    if worst[1]:
        logger.info(
            "int8 row-wise: re-quantised %d -quant linears; worst 128x128 tile error %.4f in %s (limit %.2f)",
            len(names),
            *worst,
            MAX_ROWWISE_TILE_ERROR,
        )


def _rows_from_tiles(
    name: str, codes: torch.Tensor, tile_scale: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    from ..turbo_kernels.rowwise_gemm import requantize_tiles_to_rows

    rows = requantize_tiles_to_rows(codes, tile_scale)
    if not rows.worst_tile_error <= MAX_ROWWISE_TILE_ERROR:
        raise CheckpointError(
            f"{name}: re-quantising its int8 tiles to one scale per output channel moves a 128x128 tile "
            f"by {rows.worst_tile_error:.3f} (rel-L2; the limit is {MAX_ROWWISE_TILE_ERROR}): a much larger "
            f"tile sets its rows' scales. Load this -quant file with linear_quant 'auto' (exact int8 tiles), "
            f"or the bf16 checkpoint with 'int8_rowwise'"
        )
    return (rows.codes, rows.scale), rows.worst_tile_error


def quantize_model_linears_(model: nn.Module, target: str, work_device: torch.device | None = None) -> None:
    """Replace every `nn.Linear` inside `model.blocks` (except SLA's `proj_l`) by a quantised layer, one at
    a time, on the device each layer lives on (arithmetic on `work_device` when given)."""
    if target not in LAYER_CLASSES:
        raise ValueError(f"target must be one of {tuple(LAYER_CLASSES)}, got {target!r}")
    names = [
        name
        for name, module in model.named_modules()
        if name.startswith("blocks.") and isinstance(module, nn.Linear) and "proj_l" not in name
    ]
    for name in names:
        dense = model.get_submodule(name)
        device = dense.weight.device
        layer = LAYER_CLASSES[target](
            dense.in_features,
            dense.out_features,
            bias=dense.bias is not None,
            device="meta",
            bias_dtype=dense.weight.dtype,
        )
        state = {key: value for key, value in dense.state_dict().items() if key != "weight"}
        state.update(
            zip(WEIGHT_KEYS[target], _store(target, dense.weight.detach().to(work_device or device)))
        )
        layer.load_state_dict({key: value.to(device) for key, value in state.items()}, assign=True)
        model.set_submodule(name, layer)


@dataclass(frozen=True)
class StoredFp8Linears:
    """The e4m3 block-linear weights of a ComfyUI fp8 file, kept as stored: codes and per-tensor scales,
    both keyed by the weight's key in the file."""

    codes: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]


def split_stored_fp8_linears(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], StoredFp8Linears]:
    """Take the block-linear weights of a ComfyUI fp8 state dict out so that they stay fp8 (FORMATS.md §1.6).

    Returns the rest of the state (to be dequantised as usual) and the kept weights. Only when every block
    linear is float8_e4m3fn with at most a per-tensor scale; otherwise nothing is kept and the whole file is
    dequantised, as before.
    """
    weights = [key for key in state if BLOCK_LINEAR_WEIGHT.search(key.replace(WRAPPER_SEGMENT, ""))]
    kept = StoredFp8Linears({}, {})
    for key in weights:
        layer = key[: -len(".weight")]
        scales = [state[layer + suffix] for suffix in COMFY_FP8_SCALE_SUFFIXES if layer + suffix in state]
        if state[key].dtype != torch.float8_e4m3fn or any(scale.numel() != 1 for scale in scales):
            return dict(state), StoredFp8Linears({}, {})
        kept.codes[key] = state[key]
        kept.scales[key] = scales[0].reshape(()).float() if scales else torch.ones((), dtype=torch.float32)
    dropped = set(kept.codes) | {
        key[: -len(".weight")] + s for key in kept.codes for s in COMFY_FP8_SCALE_SUFFIXES
    }
    return {key: value for key, value in state.items() if key not in dropped}, kept


def _dense_weight(stored: str, *tensors: torch.Tensor) -> torch.Tensor:
    if stored == "int8":
        codes, scale = tensors
        return dequantize_tiles(codes, scale, torch.float32)
    if stored in ("fp8", "int8_rowwise"):
        codes, scale = tensors
        return codes.float() * scale[:, None]
    return tensors[0]


def _store(target: str, dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if target == "int8":
        return quantize_tiles(dense)
    if target == "fp8":
        return quantize_rows_e4m3(dense)
    if target == "int8_rowwise":
        from ..turbo_kernels.rowwise_gemm import quantize_rows_int8  # imports Triton

        return quantize_rows_int8(dense)
    return (dense,)
