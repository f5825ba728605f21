"""The umT5-XXL text encoder of Wan 2.1 / 2.2: checkpoint detection, loading and prompt encoding.

The network is transformers' `UMT5EncoderModel`, configured from the checkpoint's shapes (real model: vocab
256384, width 4096, 64 heads x 64, FFN 10240 gated-GELU (tanh), 24 layers, a relative-position table of 32
buckets in every layer, max distance 128, RMS-norm eps 1e-6). `encode` reproduces TurboDiffusion's
`rcm/utils/umt5.py`: tokens padded to 512, the encoder run with the attention mask, every position past the
prompt's length (EOS included) set to exact zeros, so the context is always [B, 512, D].

Checkpoint layouts, recognised from their keys (FORMATS.md §3.1):

* original / TurboDiffusion `models_t5_umt5-xxl-enc-bf16.pth`: `token_embedding.weight`, `blocks.N.*`;
* ComfyUI `umt5_xxl_fp16.safetensors` and the fp8 variants: transformers names (possibly under
  `text_encoders.umt5xxl.transformer.`) plus a `spiece_model` tensor holding the tokenizer;
* a transformers folder (`config.json` + safetensors, or a full UMT5 model whose decoder is ignored).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint_io import CheckpointError, read_safetensors_metadata, read_state_dict
from .fp8_formats import dequantize_comfy_fp8, has_comfy_fp8
from .tokenizer import SPIECE_TENSOR_KEY, TEXT_LEN, PromptTokenizer, resolve_tokenizer

if TYPE_CHECKING:  # transformers is imported when a model is built, not when this module is
    from transformers import UMT5Config, UMT5EncoderModel

COMFY_PREFIX = "text_encoders.umt5xxl.transformer."
EMBEDDING_KEY = "shared.weight"
TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"
# Parts of a full (encoder-decoder) UMT5 checkpoint that the encoder does not use.
DECODER_PREFIXES = ("decoder.", "lm_head.")
RELATIVE_BIAS_KEY = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
# Original (Wan / TurboDiffusion) names → transformers names.
ORIGINAL_KEY_MAP = (
    (r"token_embedding\.weight", EMBEDDING_KEY),
    (r"norm\.weight", "encoder.final_layer_norm.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (
        r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
)
# Keys that identify the other Wan model files, so that a wrong file gets a useful message.
OTHER_MODEL_MARKERS = (
    ("patch_embedding.weight", "a Wan DiT (diffusion model); load it with the TurboDiffusion model loader"),
    ("time_embedding.0.weight", "a Wan DiT (diffusion model); load it with the TurboDiffusion model loader"),
    ("decoder.conv1.weight", "the Wan VAE; load it with the TurboDiffusion VAE loader"),
    ("encoder.conv1.weight", "the Wan VAE; load it with the TurboDiffusion VAE loader"),
    ("visual.transformer.resblocks.0.attn.in_proj_weight", "a CLIP image encoder"),
    ("vision_model.embeddings.patch_embedding.weight", "a CLIP image encoder"),
)


@dataclass
class TextEncoderWeights:
    """A umT5 encoder checkpoint in transformers' names, with what it says about itself."""

    state: dict[str, torch.Tensor]
    layout: str  # "original" or "transformers"
    spiece_model: torch.Tensor | None


class UMT5TextEncoder(nn.Module):
    """Prompts → umT5 context [B, 512, D], zero beyond each prompt's tokens (TurboDiffusion's convention)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PromptTokenizer, text_len: int = TEXT_LEN) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.encoder.final_layer_norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of token ids [B, L], with the positions the mask excludes set to zero."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.masked_fill(~attention_mask.bool()[..., None], 0)

    @torch.no_grad()
    def encode_with_lengths(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The context [B, 512, D] in the model's dtype and each prompt's token count (EOS included)."""
        ids, mask = self.tokenizer(prompts, self.text_len)
        context = self(ids.to(self.device), mask.to(self.device))
        return context, mask.sum(dim=1)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """The context [B, 512, D] in the model's dtype; rows past a prompt's tokens are exact zeros."""
        return self.encode_with_lengths(prompts)[0]


def pad_context_to_512(context: torch.Tensor) -> torch.Tensor:
    """A text context [B, L, D] zero-padded or cropped to [B, 512, D], the length the Wan DiT was trained on.

    For contexts from elsewhere, e.g. ComfyUI's CLIPTextEncode, which may stop at the prompt's length.
    """
    if context.ndim != 3:
        raise ValueError(f"expected a text context [batch, tokens, width], got shape {list(context.shape)}")
    length = context.shape[1]
    if length >= TEXT_LEN:
        return context[:, :TEXT_LEN]
    return nn.functional.pad(context, (0, 0, 0, TEXT_LEN - length))


def load_text_encoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    *,
    allow_download: bool = False,
    hf_cache_dir: str | Path | None = None,
) -> UMT5TextEncoder:
    """Load a umT5-XXL encoder checkpoint (any layout of the module docstring) with its tokenizer.

    dtype defaults to the file's own floating dtype (bfloat16 for fp8 files; pass torch.bfloat16 for
    TurboDiffusion's precision). `tokenizer` names a folder (or a `spiece.model` /
    `tokenizer.json` file) to use when the checkpoint carries no tokenizer of its own; see `resolve_tokenizer`
    for the full search order. The Hugging Face hub is only contacted when `allow_download` is true.
    """
    path = Path(path)
    state, metadata = read_state_dict(path), read_safetensors_metadata(path)
    dtype = dtype or _stored_dtype(state, metadata)
    weights = parse_text_encoder_state(state, metadata, dtype, path.name)
    del state
    config = umt5_config_from_state_dict(weights.state)
    model = build_umt5_encoder(config)
    check_state_matches(model, weights.state, path.name)
    text_tokenizer = resolve_tokenizer(
        weights.spiece_model,
        _tokenizer_search_paths(path, tokenizer),
        allow_download=allow_download,
        hf_cache_dir=hf_cache_dir,
    )
    if text_tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer from {text_tokenizer.source} has {text_tokenizer.vocab_size} pieces, more than "
            f"the {config.vocab_size} embeddings of {path.name}; it belongs to another model, use umT5's"
        )
    _assign_weights(model, weights.state, device, dtype)
    return UMT5TextEncoder(model, text_tokenizer)


def _stored_dtype(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> torch.dtype:
    """The floating dtype most of the file's tensors have; fp8 files compute in bfloat16."""
    if has_comfy_fp8(state, metadata):
        return torch.bfloat16
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else torch.bfloat16


def parse_text_encoder_state(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    source: str = "checkpoint",
) -> TextEncoderWeights:
    """The encoder's tensors in transformers' names, fp8 dequantised to `dtype`, tokenizer tensor apart.

    Shape-only inspection works too: without fp8 tensors, meta tensors go through unchanged.
    """
    state = _select_encoder_keys(state)
    spiece_keys = [key for key in state if key == SPIECE_TENSOR_KEY or key.endswith("." + SPIECE_TENSOR_KEY)]
    spiece_model = state[spiece_keys[0]] if spiece_keys else None
    state = {key: tensor for key, tensor in state.items() if key not in spiece_keys}
    layout = detect_text_encoder_layout(state, source)
    if layout == "original":
        state = {_transformers_name(key, source): tensor for key, tensor in state.items()}
    elif has_comfy_fp8(state, metadata):
        state = dequantize_comfy_fp8(state, metadata, dtype)
    if EMBEDDING_KEY not in state:
        state[EMBEDDING_KEY] = state.pop(TIED_EMBEDDING_KEY)
    state.pop(TIED_EMBEDDING_KEY, None)
    _check_is_umt5(state, source)
    return TextEncoderWeights(state, layout, spiece_model)


def detect_text_encoder_layout(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """ "original" (Wan / TurboDiffusion names) or "transformers" (ComfyUI / transformers names)."""
    if "token_embedding.weight" in state and "blocks.0.attn.q.weight" in state:
        return "original"
    if (EMBEDDING_KEY in state or TIED_EMBEDDING_KEY in state) and (
        "encoder.block.0.layer.0.SelfAttention.q.weight" in state
    ):
        return "transformers"
    for marker, kind in OTHER_MODEL_MARKERS:
        if any(key == marker or key.endswith("." + marker) for key in state):
            raise CheckpointError(f"{source} holds {kind}, not the umT5-XXL text encoder")
    example = ", ".join(sorted(state)[:3]) or "no tensors"
    raise CheckpointError(
        f"{source} is not a umT5 text-encoder checkpoint of a known layout (found e.g. {example}). Expected "
        f"Wan's models_t5_umt5-xxl-enc-bf16.pth or ComfyUI's umt5_xxl_fp16.safetensors / "
        f"umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    )


def umt5_config_from_state_dict(state: Mapping[str, torch.Tensor]) -> UMT5Config:
    """The configuration of the encoder whose (transformers-named) tensors are given; reads only shapes."""
    vocab_size, d_model = state[EMBEDDING_KEY].shape
    num_layers = len({int(m.group(1)) for key in state if (m := re.match(r"encoder\.block\.(\d+)\.", key))})
    num_buckets, num_heads = state[RELATIVE_BIAS_KEY.format(0)].shape
    inner_dim = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    if inner_dim % num_heads:
        raise CheckpointError(
            f"the attention width {inner_dim} is not a multiple of the {num_heads} heads that the "
            f"relative-position table implies; the checkpoint is damaged or not umT5"
        )
    return umt5_encoder_config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        num_heads=num_heads,
        d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=num_layers,
        relative_attention_num_buckets=num_buckets,
    )


def umt5_encoder_config(
    vocab_size: int,
    d_model: int,
    d_kv: int,
    num_heads: int,
    d_ff: int,
    num_layers: int,
    relative_attention_num_buckets: int = 32,
) -> UMT5Config:
    """A umT5 encoder's configuration from its sizes; the rest is fixed for every umT5 (gated-GELU FFN,
    relative positions up to 128, RMSNorm epsilon 1e-6, no dropout, encoder only)."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        num_heads=num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        relative_attention_num_buckets=relative_attention_num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def build_umt5_encoder(config: UMT5Config) -> UMT5EncoderModel:
    """An empty (meta-device) encoder, to be filled with `load_state_dict(assign=True)`."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        return UMT5EncoderModel(config).eval()


def check_state_matches(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise `CheckpointError` naming what differs between the model's tensors and the checkpoint's."""
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    expected.pop(TIED_EMBEDDING_KEY)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key} {tuple(state[key].shape)} (expected {expected[key]})"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors of the wrong shape, e.g. {mismatched[0]}")
    if problems:
        raise CheckpointError(
            f"{source} does not match a umT5 encoder built from its own shapes: {'; '.join(problems)}. "
            f"The file is incomplete or not a umT5 encoder"
        )


def _select_encoder_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text encoder's part: ComfyUI's prefix removed, a full UMT5 model's decoder dropped."""
    if any(key.startswith(COMFY_PREFIX) for key in state):
        state = {
            key.removeprefix(COMFY_PREFIX): tensor
            for key, tensor in state.items()
            if key.startswith(COMFY_PREFIX) or key.endswith(SPIECE_TENSOR_KEY)
        }
    return {key: tensor for key, tensor in state.items() if not key.startswith(DECODER_PREFIXES)}


def _transformers_name(key: str, source: str) -> str:
    for pattern, replacement in ORIGINAL_KEY_MAP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise CheckpointError(f"{source}: unexpected tensor {key!r} for a Wan umT5 encoder (original layout)")


def _check_is_umt5(state: Mapping[str, torch.Tensor], source: str) -> None:
    """umT5 has gated FFNs and a position table in every layer; T5 v1.0 / v1.1 and mT5 do not."""
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in state:
        raise CheckpointError(f"{source} holds a T5 encoder without gated FFN (T5 v1.0), not umT5-XXL")
    if RELATIVE_BIAS_KEY.format(0) not in state:
        raise CheckpointError(f"{source} has no relative-position table in its first layer; it is not umT5")
    if "encoder.block.1.layer.0.SelfAttention.q.weight" in state and RELATIVE_BIAS_KEY.format(1) not in state:
        raise CheckpointError(
            f"{source} holds a T5 v1.1 / mT5 encoder (one shared position table, e.g. Flux's or SD3's "
            f"t5xxl), not the umT5-XXL encoder Wan needs (umt5_xxl_fp16.safetensors)"
        )


def _tokenizer_search_paths(checkpoint: Path, tokenizer: str | Path | None) -> list[Path]:
    paths = []
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.exists():
            raise FileNotFoundError(f"tokenizer folder or file not found: {tokenizer}")
        paths.append(tokenizer)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return [*paths, folder, folder / "google" / "umt5-xxl"]


def _assign_weights(
    model: nn.Module, state: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype
) -> None:
    """Move every tensor to its place and dtype, one at a time, and put it into the meta model."""
    placed = {}
    for key in list(state):
        # As transformers does in float16: the FFN output projection of T5 models overflows in half precision.
        keep_fp32 = dtype == torch.float16 and key.endswith("DenseReluDense.wo.weight")
        target = torch.float32 if keep_fp32 else dtype
        placed[key] = state.pop(key).to(device=device, dtype=target)
    placed[TIED_EMBEDDING_KEY] = placed[EMBEDDING_KEY]
    model.load_state_dict(placed, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared
    model.requires_grad_(False)
