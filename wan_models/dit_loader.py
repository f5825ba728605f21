"""Loading a Wan DiT from any of its released layouts, recognised by content (never by file name).

Families (FORMATS.md §1.1): `turbodiffusion` / `turbodiffusion-quant` (`.pth`, 2-D patch embedding, SLA
`proj_l`, int8 block linears), `original` (Wan release safetensors, single or sharded), `comfyui` (the same
names, 5-D patch embedding, optional `model.diffusion_model.` prefix, fp16/bf16/fp8), `diffusers`
(`WanTransformer3DModel` names). All are brought to the original key names with the Linear patch embedding,
then loaded strictly into a `WanDiT` built on the meta device, so a real-size file is never held twice.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from .attention import make_self_attention, sdpa_attention
from .block_ops import make_block_ops
from .checkpoint_io import CheckpointError, naming_file, read_safetensors_metadata, read_state_dict
from .config import WanDiTConfig, config_from_state_dict
from .dit import AttentionFn, WanDiT
from .forward_modes import FORWARD_MODES, set_forward_mode
from .fp8_formats import FP8_DTYPES, dequantize_comfy_fp8, has_comfy_fp8, is_fp8_auxiliary_key
from .linear_layers import (
    LinearFactory,
    fp8_linear_factory,
    int8_linear_factory,
    int8_rowwise_linear_factory,
    set_linear_activations,
)
from .quantize import (
    StoredFp8Linears,
    convert_linear_weights_,
    quantized_linear_names,
    split_stored_fp8_linears,
    target_storage,
)

WRAPPER_SEGMENT = "_checkpoint_wrapped_module."
# Full ComfyUI checkpoints bundle the VAE and text encoder beside the DiT under this prefix.
COMFYUI_CHECKPOINT_PREFIX = "model.diffusion_model."
PREFIXES_TO_TRY = ("", COMFYUI_CHECKPOINT_PREFIX, "diffusion_model.", "net.", "model.", "module.")
FP8_COMPUTE_DTYPE = torch.bfloat16
# Norm weights stay float32, as in TurboDiffusion's fused-norm modules; they are cast on use.
FLOAT32_KEYS = re.compile(r"\.(norm_q|norm_k|norm3)\.(weight|bias)$")
SHOWN_KEYS = 5

FAMILY_DESCRIPTIONS = {
    "turbodiffusion": "TurboDiffusion .pth",
    "turbodiffusion-quant": "TurboDiffusion -quant .pth (int8 linears)",
    "original": "Wan release safetensors",
    "comfyui": "ComfyUI diffusion-model file",
    "diffusers": "diffusers WanTransformer3DModel",
}
SUPPORTED_FILES = (
    "TurboWan2.1-T2V-*.pth / TurboWan2.2-I2V-A14B-*.pth (plain or -quant), Wan2.1/Wan2.2 "
    "diffusion_pytorch_model*.safetensors, ComfyUI wan2.1_t2v_*/wan2.2_i2v_* diffusion models "
    "(fp16/bf16/fp8), or a diffusers transformer folder"
)
OTHER_MODELS = (
    (
        "a Wan VAE; load it with the VAE loader",
        ("decoder.middle.0.residual.0.gamma", "decoder.mid_block.resnets.0.norm1.gamma"),
    ),
    (
        "a umT5 text encoder; load it with the text-encoder loader",
        ("token_embedding.weight", "shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"),
    ),
    (
        "a CLIP image encoder, which TurboDiffusion does not use",
        ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", "visual.proj"),
    ),
)

_DIFFUSERS_TOP_LEVEL = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
# A lookup (not successive substring replacements), so the norm2 -> norm3 rename cannot chain.
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class DiTLayout:
    """What a DiT checkpoint holds, read from key names and shapes alone."""

    family: str
    prefix: str
    config: WanDiTConfig
    quantized: bool
    fp8: bool
    sla: bool

    @property
    def kind(self) -> str:
        return self.config.kind


def detect_dit_layout(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> DiTLayout:
    """The layout of a DiT state dict (real or meta tensors); CheckpointError if it is not a supported DiT."""
    return _read_layout(state, has_comfy_fp8(state, metadata))[0]


def load_dit(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attention: str | AttentionFn = "sdpa",
    sla_topk: float = 0.1,
    linear_quant: str = "auto",
    quantize_device: str | torch.device | None = None,
    forward_mode: str = "none",
) -> WanDiT:
    """A WanDiT with the weights of a file or folder, ready for inference.

    dtype None keeps the file's floating dtype (bf16 for fp8 files); int8 weights stay int8 and norm
    weights float32 in every case. `attention` is a backend name for `make_self_attention` or a function.

    `linear_quant` sets how the linears inside the blocks are stored: "auto" as in the file and computed
    as the file's makers do (int8 W8A8 for `-quant` files; ComfyUI e4m3 fp8 files keep their fp8 weights
    and dequantise them per layer, as ComfyUI does; dense otherwise), "none" dense (int8 / fp8 weights are
    dequantised), "int8" TurboDiffusion's `-quant` format (quantised from the stored weights, bit-exact to
    the reference quantiser), "fp8" e4m3 W8A8 with per-channel weight scales (fp8 files keep their
    weights), "int8_rowwise" int8 with one scale per output channel and per-token activation scales (the
    fast int8 path on Hopper / Ada; other numerics than `-quant`: a `-quant` file's tiles are re-quantised
    per row and a layer losing too much is refused, `quantize.MAX_ROWWISE_TILE_ERROR`; needs Triton).
    Converting reads the file to the CPU and converts one layer at a time on `quantize_device`
    (default `device`; pass the GPU when loading to the CPU), so memory never holds two copies of the model.

    The norms, RoPE and residuals of the blocks run as fused Triton kernels on CUDA GPUs that can build them
    (`block_ops.make_block_ops("auto")`). `forward_mode` ("none", "cudagraphs", "default", "max-autotune";
    see `forward_modes`) replays the forward from CUDA graphs or compiles the blocks with torch.compile;
    `set_forward_mode` changes it later.
    """
    path = Path(path)
    _check_options(linear_quant, forward_mode)  # before the file is read
    device = torch.device(device)
    try:
        model = _load(
            path, device, dtype, attention, sla_topk, linear_quant, _quantize_device(quantize_device, device)
        )
    except CheckpointError as error:
        raise naming_file(error, path) from None
    set_forward_mode(model, forward_mode)
    return model


def require_kind(model: WanDiT, kind: str) -> None:
    """Raise a clear error unless the model is a "t2v" or an "i2v" model, as the caller needs."""
    if model.kind == kind:
        return
    name = f"{Path(model.source).name!r}" if model.source else "the model"
    if model.kind == "i2v":
        raise CheckpointError(
            f"{name} holds a Wan2.2 I2V A14B expert (in_dim {model.config.in_dim}); use it for "
            f"image-to-video, and a TurboWan2.1-T2V model for text-to-video"
        )
    raise CheckpointError(
        f"{name} holds a text-to-video model (in_dim {model.config.in_dim}); image-to-video needs the "
        f"TurboWan2.2-I2V-A14B high- and low-noise experts"
    )


def dit_from_state_dict(
    state: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attention: str | AttentionFn = "sdpa",
    sla_topk: float = 0.1,
    linear_quant: str = "auto",
    quantize_device: str | torch.device | None = None,
    forward_mode: str = "none",
    metadata: Mapping[str, str] | None = None,
) -> WanDiT:
    """`load_dit` for a state dict already in memory (any layout `load_dit` reads; safetensors `metadata`
    for ComfyUI fp8 files). Tensors that need no conversion are used as they are, not copied, so several
    models (or another implementation) can share one set of weights."""
    _check_options(linear_quant, forward_mode)
    device = torch.device(device)
    quantize_device = _quantize_device(quantize_device, device)
    model = _from_state(
        state, metadata or {}, device, dtype, attention, sla_topk, linear_quant, quantize_device
    )
    set_forward_mode(model, forward_mode)
    return model


def _check_options(linear_quant: str, forward_mode: str) -> None:
    target_storage(linear_quant, "dense")  # validates the option
    if linear_quant == "int8_rowwise" and importlib.util.find_spec("triton") is None:
        raise ValueError(
            "linear_quant 'int8_rowwise' needs Triton (its quantisers are Triton modules); install Triton "
            "or choose 'int8'"
        )
    if forward_mode not in FORWARD_MODES:
        raise ValueError(f"unknown forward_mode {forward_mode!r}; choose one of {', '.join(FORWARD_MODES)}")


def _quantize_device(quantize_device: str | torch.device | None, device: torch.device) -> torch.device:
    return torch.device(quantize_device) if quantize_device is not None else device


def _load(
    path: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    attention: str | AttentionFn,
    sla_topk: float,
    linear_quant: str,
    quantize_device: torch.device,
) -> WanDiT:
    # A conversion may shrink the model: read to the CPU and move each tensor once it has its final form.
    state = read_state_dict(path, device if linear_quant == "auto" else "cpu")
    metadata = read_safetensors_metadata(path)
    model = _from_state(
        state, metadata, device, dtype, attention, sla_topk, linear_quant, quantize_device, consume=True
    )
    model.source = str(path)
    return model


def _from_state(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    device: torch.device,
    dtype: torch.dtype | None,
    attention: str | AttentionFn,
    sla_topk: float,
    linear_quant: str,
    quantize_device: torch.device,
    consume: bool = False,
) -> WanDiT:
    """The model for a state dict; `consume` empties the caller's dict once read, so that converted weights
    free their originals layer by layer (the file's copy is never held twice)."""
    given = state
    fp8 = has_comfy_fp8(state, metadata)
    kept = StoredFp8Linears({}, {})
    if fp8:
        dtype = dtype or FP8_COMPUTE_DTYPE
        if linear_quant in ("auto", "fp8"):
            state, kept = split_stored_fp8_linears(state)
        state = {**dequantize_comfy_fp8(state, metadata, dtype), **kept.codes}
    layout, weights = _read_layout(state, fp8)
    if consume:
        given.clear()
    del state, given
    for key, scale in kept.scales.items():
        name = key.replace(WRAPPER_SEGMENT, "")[len(layout.prefix) :]
        weights[name + "_scale"] = scale.expand(weights[name].shape[0]).clone()
    dtype = dtype or weights["patch_embedding.weight"].dtype
    self_attention = make_self_attention(attention, sla_topk) if isinstance(attention, str) else attention
    stored = "fp8" if kept.codes else "int8" if layout.quantized else "dense"
    target = target_storage(linear_quant, stored)
    with torch.device("meta"):
        model = _build(layout, self_attention, dtype, stored)
    _check_keys_and_shapes(weights, model, layout)
    if target != stored:
        with torch.device("meta"):
            converted = _build(layout, self_attention, dtype, target)
        names = quantized_linear_names(model if stored != "dense" else converted)
        convert_linear_weights_(weights, names, stored, target, quantize_device, device)
        model = converted
    _cast_for_compute_(weights, dtype, device)
    model.load_state_dict(weights, strict=True, assign=True)
    if stored == "fp8" and linear_quant == "auto":
        set_linear_activations(model, "weight_only")  # what ComfyUI computes for its fp8 files
    return model.requires_grad_(False).eval()


def _build(layout: DiTLayout, self_attention: AttentionFn, dtype: torch.dtype, storage: str) -> WanDiT:
    factories: dict[str, LinearFactory] = {
        "dense": nn.Linear,
        "int8": int8_linear_factory(bias_dtype=dtype),
        "fp8": fp8_linear_factory(bias_dtype=dtype),
        "int8_rowwise": int8_rowwise_linear_factory(bias_dtype=dtype),
    }
    return WanDiT(
        layout.config,
        self_attention=self_attention,
        cross_attention=sdpa_attention,
        linear_factory=factories[storage],
        block_ops=make_block_ops("auto"),
    )


def _read_layout(state: Mapping[str, torch.Tensor], fp8: bool) -> tuple[DiTLayout, dict[str, torch.Tensor]]:
    """The layout and the weights under original key names with the Linear patch embedding."""
    weights = {key.replace(WRAPPER_SEGMENT, ""): value for key, value in state.items()}
    weights = {key: value for key, value in weights.items() if not is_fp8_auxiliary_key(key)}
    prefix = _dit_prefix(weights)
    outside = [key for key in weights if not key.startswith(prefix)]
    if outside and prefix != COMFYUI_CHECKPOINT_PREFIX:
        raise CheckpointError(
            f"the DiT keys carry the prefix {prefix!r} but {len(outside)} other keys do not, e.g. "
            f"{', '.join(outside[:SHOWN_KEYS])}"
        )
    body = {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
    diffusers = "condition_embedder.time_proj.weight" in body
    if diffusers:
        body = {_original_name(key): value for key, value in body.items()}
    _refuse_unsupported_models(body)
    patch = body["patch_embedding.weight"]
    if patch.dim() == 5:
        body["patch_embedding.weight"] = patch.flatten(1)
    try:
        config = config_from_state_dict(body)
    except CheckpointError as error:
        raise CheckpointError(f"{error}. {_unknown_layout_message(weights)}") from None
    if config.out_dim != 16:
        raise CheckpointError(
            f"the model predicts {config.out_dim} latent channels; only the 16-channel Wan2.1 / Wan2.2 A14B "
            f"models are supported (Wan2.2 TI2V-5B is not)"
        )
    quantized = any(key.endswith(".int8_weight") for key in body)
    layout = DiTLayout(
        family=_family(diffusers, quantized, patch, prefix, fp8),
        prefix=prefix,
        config=config,
        quantized=quantized,
        fp8=fp8,
        sla=config.has_sla_proj,
    )
    return layout, body


def _dit_prefix(weights: Mapping[str, torch.Tensor]) -> str:
    anchor = "patch_embedding.weight"
    prefixes = [
        key[: -len(anchor)]
        for key in weights
        if key.endswith(anchor) and (key == anchor or key[: -len(anchor)].endswith("."))
    ]
    prefixes = [p for p in prefixes if any(key.startswith(p + "blocks.0.") for key in weights)]
    if len(prefixes) == 1:
        return prefixes[0]
    if len(prefixes) > 1:
        raise CheckpointError(
            f"the file holds several DiTs (under the prefixes {prefixes}); keep one of them"
        )
    for description, markers in OTHER_MODELS:
        if any(key.endswith(marker) for key in weights for marker in markers):
            raise CheckpointError(f"this file is {description}, not a Wan diffusion model (DiT)")
    raise CheckpointError(_unknown_layout_message(weights))


def _original_name(diffusers_key: str) -> str:
    if diffusers_key == "scale_shift_table":
        return "head.modulation"
    block = _BLOCK_KEY.match(diffusers_key)
    if block:
        index, rest = block.groups()
        if rest == "scale_shift_table":
            return f"blocks.{index}.modulation"
        module, _, parameter = rest.rpartition(".")
        return f"blocks.{index}.{_DIFFUSERS_BLOCK.get(module, module)}.{parameter}"
    module, _, parameter = diffusers_key.rpartition(".")
    return f"{_DIFFUSERS_TOP_LEVEL.get(module, module)}.{parameter}"


def _refuse_unsupported_models(body: Mapping[str, torch.Tensor]) -> None:
    if any(key.startswith("img_emb.") or ".k_img." in key for key in body):
        flf = " FLF2V" if "img_emb.emb_pos" in body else ""
        raise CheckpointError(
            f"this is a Wan2.1 I2V{flf} model with a CLIP image branch, which TurboDiffusion does not "
            f"support; image-to-video uses the TurboWan2.2-I2V-A14B experts"
        )


def _family(diffusers: bool, quantized: bool, patch: torch.Tensor, prefix: str, fp8: bool) -> str:
    if diffusers:
        return "diffusers"
    if quantized:
        return "turbodiffusion-quant"
    if patch.dim() == 2:
        return "turbodiffusion"
    # Original and ComfyUI files share key names; ComfyUI's own packaging is told by prefix or fp8.
    return "comfyui" if fp8 or prefix == COMFYUI_CHECKPOINT_PREFIX else "original"


def _cast_for_compute_(weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
    """Cast and move in place, one tensor at a time, so the old copy of each is freed as soon as it is
    replaced. Integer and fp8 weights keep their dtype."""
    for key, tensor in weights.items():
        if not tensor.is_floating_point() or tensor.dtype in FP8_DTYPES:
            weights[key] = tensor.to(device)
            continue
        keep_float32 = FLOAT32_KEYS.search(key) or _is_quantization_scale(key, weights)
        weights[key] = tensor.to(device, torch.float32 if keep_float32 else dtype)


def _is_quantization_scale(key: str, weights: Mapping[str, torch.Tensor]) -> bool:
    """The float32 scale of an int8 (`scale`) or fp8 (`weight_scale`) linear."""
    if key.endswith(".weight_scale"):
        return key[: -len("_scale")] in weights
    return key.endswith(".scale") and key[: -len("scale")] + "int8_weight" in weights


def _check_keys_and_shapes(weights: Mapping[str, torch.Tensor], model: WanDiT, layout: DiTLayout) -> None:
    expected = model.state_dict()
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unexpected or missing:
        raise CheckpointError(
            f"the keys do not match a {FAMILY_DESCRIPTIONS[layout.family]} Wan DiT with "
            f"{layout.config.num_layers} blocks. {_key_lists(unexpected, missing)}"
        )
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{key} has shape {tuple(tensor.shape)} in the file, but a model of the inferred shape "
                f"(dim {layout.config.dim}, ffn {layout.config.ffn_dim}) needs {tuple(expected[key].shape)}"
            )


def _unknown_layout_message(weights: Mapping[str, torch.Tensor]) -> str:
    best = None
    for prefix in PREFIXES_TO_TRY:
        names: dict[str, str] = {}
        for key in sorted(weights):
            if key.startswith(prefix):
                names.setdefault(_skeleton(key[len(prefix) :]), key)
        for family, skeleton in _family_skeletons().items():
            score = len(names.keys() & skeleton) / max(len(names.keys() | skeleton), 1)
            if best is None or score > best[0]:
                best = (score, family, names, skeleton)
    score, family, names, skeleton = best
    unexpected = sorted(key for name, key in names.items() if name not in skeleton)
    missing = sorted(skeleton - names.keys())
    return (
        f"Not a known Wan DiT layout. Closest: {FAMILY_DESCRIPTIONS[family]} ({score:.0%} of key names "
        f"shared). {_key_lists(unexpected, missing)} Supported: {SUPPORTED_FILES}"
    )


def _key_lists(unexpected: list[str], missing: list[str]) -> str:
    parts = []
    if unexpected:
        parts.append(
            f"First unexpected keys ({len(unexpected)} in all): {', '.join(unexpected[:SHOWN_KEYS])}."
        )
    if missing:
        parts.append(f"First missing keys ({len(missing)} in all): {', '.join(missing[:SHOWN_KEYS])}.")
    return " ".join(parts)


def _skeleton(key: str) -> str:
    return _BLOCK_KEY.sub(r"blocks.N.\2", key)


@cache
def _family_skeletons() -> dict[str, frozenset[str]]:
    """Key names per family with block numbers replaced by N, from tiny models built on meta."""
    tiny = WanDiTConfig(dim=128, ffn_dim=128, num_heads=1, num_layers=1, text_dim=16)
    with torch.device("meta"):
        plain = WanDiT(tiny, self_attention=sdpa_attention, cross_attention=sdpa_attention)
        quant = WanDiT(
            dataclasses.replace(tiny, has_sla_proj=True),
            self_attention=sdpa_attention,
            cross_attention=sdpa_attention,
            linear_factory=int8_linear_factory(),
        )
    original = frozenset(_skeleton(key) for key in plain.state_dict())
    quantized = frozenset(_skeleton(key) for key in quant.state_dict())
    diffusers_names = [
        *(f"{module}.{p}" for module in _DIFFUSERS_TOP_LEVEL for p in ("weight", "bias")),
        *(f"blocks.0.{module}.{p}" for module in _DIFFUSERS_BLOCK for p in ("weight", "bias")),
        *(
            "patch_embedding.weight",
            "patch_embedding.bias",
            "scale_shift_table",
            "blocks.0.scale_shift_table",
        ),
    ]
    return {
        "original": original,
        "turbodiffusion": original | {key for key in quantized if ".proj_l." in key},
        "turbodiffusion-quant": quantized,
        "diffusers": frozenset(
            _skeleton(key) for key in diffusers_names if _skeleton(_original_name(key)) in original
        ),
    }
