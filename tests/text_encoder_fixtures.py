"""Tiny umT5 encoders and tokenizers, written in the real checkpoint formats, for the text-encoder tests.

Other tests may import these helpers: `tokenizer_model_bytes()` (a SentencePiece model trained here, offline),
`make_tiny_umt5()` (a transformers UMT5EncoderModel with every parameter randomised, FORMATS.md §5), the
`write_*` functions (Wan `.pth`, ComfyUI safetensors incl. fp8 scaled, transformers folder) and
`reference_context()` (transformers run directly, zeroed past each prompt: TurboDiffusion's output).
"""

from __future__ import annotations

import html
import importlib.util
import re
import sys
from functools import lru_cache
from pathlib import Path

import torch
from sentencepiece_model import train_unigram_tokenizer

TEXT_LEN = 512
# Prompts in several scripts; the tokenizer is trained on them, so every character has a piece.
TRAINING_PROMPTS = (
    "A red fox runs through a snowy forest at dawn, cinematic lighting, shallow depth of field.",
    "Two astronauts float inside a space station, Earth glowing through the round window.",
    "Un chat noir saute sur le toit; très réaliste, lumière dorée du soir.",
    "Ein Hund läuft durch den Park, Zeitlupe, warme Farben und weiches Licht.",
    "Кошка гуляет по траве в солнечный день, камера медленно движется.",
    "Старый поезд едет через горы, туман и снег, эпичный кадр.",
    "一只猫在草地上散步，电影般的灯光，细节丰富。",
    "海浪拍打着岩石，夕阳把天空染成橙色。",
    "犬が公園で走っている、スローモーション、美しい光。",
    "A close-up of rain drops falling on a green leaf, macro shot, 4k, 60 fps!",
    "The camera pans over a busy market street in Tokyo at night, neon signs reflect in puddles.",
    "Slow motion: a hummingbird hovers near a purple flower (ultra detailed) & sharp focus.",
)


def make_transformers_importable() -> None:
    """Let transformers' model modules import with this venv's CUDA-only torchvision (COMFYUI_HOST.md §1.3).

    transformers imports torchvision when it is installed; the only torchvision wheel for torch 2.13 cannot
    load its compiled ops under a CPU torch and fails at import. Declaring the two operator schemas it looks
    up makes the import succeed. Does nothing when torchvision imports by itself (matching build, or a guard).
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError:
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP_ALIVE.append(library)  # the declarations vanish when the library object is collected
    import torchvision  # noqa: F401, F811


_KEEP_ALIVE: list = []
make_transformers_importable()

from transformers import AutoTokenizer, T5Tokenizer, UMT5Config, UMT5EncoderModel  # noqa: E402


@lru_cache(maxsize=4)
def tokenizer_model_bytes(vocab_size: int = 400) -> bytes:
    """A serialized SentencePiece unigram model (pad 0, EOS 1, unk 2, no BOS, byte fallback), ~0.05 s."""
    corpus = [f"{prompt} {index}" for index in range(40) for prompt in TRAINING_PROMPTS]
    return train_unigram_tokenizer(corpus, vocab_size)


def long_prompt(count: int = 3) -> str:
    """The first `count` training prompts joined: 3 give ~235 tokens (past the 128 of the exact buckets),
    all 12 give ~740 (past 512, so truncated)."""
    return " ".join(TRAINING_PROMPTS[:count])


def sample_prompts() -> list[str]:
    """A padded batch: ~235 tokens, messy whitespace and HTML entities, mixed scripts, and one over 512."""
    return [
        long_prompt(3),
        "  A red fox &amp;amp; a dog\n\n run   through a snowy forest.  ",
        "一只猫在草地上散步， Кошка гуляет по траве.",
        long_prompt(len(TRAINING_PROMPTS)),
    ]


def turbodiffusion_clean(text: str) -> str:
    """TurboDiffusion's prompt cleaning (TURBODIFFUSION.md §8.1), written out for the references."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def write_tokenizer_folder(folder: Path, spiece: bytes | None = None, *, json_only: bool = False) -> Path:
    """A folder as on the hub: `spiece.model` and the transformers files (tokenizer.json, config)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece or tokenizer_model_bytes())
    T5Tokenizer.from_pretrained(str(folder), extra_ids=0).save_pretrained(str(folder))
    if json_only:
        (folder / "spiece.model").unlink()
    return folder


def reference_ids(prompts: list[str], tokenizer_folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask as TurboDiffusion makes them: AutoTokenizer, padding to 512, truncation, EOS added."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    batch = tokenizer(
        [turbodiffusion_clean(prompt) for prompt in prompts],
        padding="max_length",
        truncation=True,
        max_length=TEXT_LEN,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return batch.input_ids, batch.attention_mask


def tiny_umt5_config(vocab_size: int = 512) -> UMT5Config:
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        num_heads=4,
        d_ff=128,
        num_layers=2,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def make_tiny_umt5(seed: int = 0, vocab_size: int = 512) -> UMT5EncoderModel:
    """A float32 UMT5EncoderModel with every parameter randomised (none left at its default init)."""
    model = UMT5EncoderModel(tiny_umt5_config(vocab_size)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                values = 1 + 0.2 * (2 * torch.rand(parameter.shape, generator=generator) - 1)
            elif "relative_attention_bias" in name:
                values = 0.5 * torch.randn(parameter.shape, generator=generator)
            elif name == "shared.weight":
                values = torch.randn(parameter.shape, generator=generator)
            else:
                values = torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5
            parameter.copy_(values)
    return model


def encoder_state(model: UMT5EncoderModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's tensors in transformers / ComfyUI names (`shared.weight` once, as ComfyUI stores it)."""
    state = {key: tensor.detach().to(dtype).clone() for key, tensor in model.state_dict().items()}
    del state["encoder.embed_tokens.weight"]
    return state


# transformers name → Wan original name, from the table of FORMATS.md §3.1.
_TO_ORIGINAL = (
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
)


def original_name(key: str) -> str:
    for pattern, replacement in _TO_ORIGINAL:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise KeyError(key)


def write_original_pth(path: Path, model: UMT5EncoderModel, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`models_t5_umt5-xxl-enc-bf16.pth` layout: Wan's key names, a plain state dict."""
    torch.save({original_name(key): tensor for key, tensor in encoder_state(model, dtype).items()}, path)
    return path


def write_comfy_safetensors(
    path: Path,
    model: UMT5EncoderModel,
    dtype: torch.dtype = torch.float16,
    *,
    spiece: bytes | None = None,
    prefix: str = "",
) -> Path:
    """ComfyUI's `umt5_xxl_fp16.safetensors`: transformers names and the tokenizer as a uint8 tensor."""
    from safetensors.torch import save_file

    state = {prefix + key: tensor for key, tensor in encoder_state(model, dtype).items()}
    if spiece is not None:
        state[prefix + "spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(state, str(path))
    return path


def write_comfy_fp8_scaled(path: Path, model: UMT5EncoderModel, spiece: bytes) -> dict[str, torch.Tensor]:
    """ComfyUI's legacy `umt5_xxl_fp8_e4m3fn_scaled.safetensors` (FORMATS.md §1.6, §3.1).

    Every Linear weight is stored as float8_e4m3fn with a per-tensor float32 `scale_weight`; the embedding is
    plain fp8 (no scale); norms and position tables stay float32. Returns the float32 weights that the file
    really encodes (fp8 value × scale), for the reference model.
    """
    from safetensors.torch import save_file

    fp8 = torch.float8_e4m3fn
    stored: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=fp8)}
    encoded: dict[str, torch.Tensor] = {}
    for key, tensor in encoder_state(model).items():
        if key == "shared.weight":
            stored[key] = tensor.to(fp8)
            encoded[key] = stored[key].float()
        elif tensor.ndim == 2 and "relative_attention_bias" not in key:
            scale = tensor.abs().max() / torch.finfo(fp8).max
            stored[key] = (tensor / scale).to(fp8)
            stored[key.replace(".weight", ".scale_weight")] = scale.reshape(())
            stored[key.replace(".weight", ".scale_input")] = torch.ones(())
            encoded[key] = stored[key].float() * scale
        else:
            stored[key] = tensor
            encoded[key] = tensor
    stored["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(stored, str(path))
    return encoded


def write_transformers_folder(folder: Path, model: UMT5EncoderModel, *, with_tokenizer: bool = True) -> Path:
    """`save_pretrained` output (config.json + model.safetensors), optionally with the tokenizer files."""
    model.save_pretrained(str(folder))
    if with_tokenizer:
        write_tokenizer_folder(folder)
    return folder


def model_with_state(state: dict[str, torch.Tensor], vocab_size: int = 512) -> UMT5EncoderModel:
    """A float32 reference model holding the given (transformers-named) weights."""
    model = UMT5EncoderModel(tiny_umt5_config(vocab_size)).eval()
    weights = {key: tensor.float() for key, tensor in state.items()}
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"]
    model.load_state_dict(weights, strict=True)
    return model


def reference_context(model: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' encoder run with the mask, rows past each prompt's length zeroed (TurboDiffusion)."""
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = [
        torch.cat([row[:n], row.new_zeros(TEXT_LEN - n, row.shape[1])]) for row, n in zip(hidden, mask.sum(1))
    ]
    return torch.stack(rows)
