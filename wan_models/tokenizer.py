"""Prompt tokenisation for the umT5-XXL text encoder, exactly as TurboDiffusion does it.

TurboDiffusion (`rcm/utils/umt5.py`) cleans every prompt (`ftfy.fix_text`, HTML-unescape twice, whitespace
collapsed, stripped), tokenises it with google/umt5-xxl's tokenizer, appends EOS (id 1), then truncates and
pads (id 0) to 512 tokens. ftfy is a dependency because its fixes (curly quotes, full-width letters,
ligatures, mojibake) change the token ids.

Where the tokenizer comes from (`resolve_tokenizer`), in this order:

1. the `spiece_model` tensor that ComfyUI stores in its umT5 files (the serialized SentencePiece model);
2. `tokenizer.json` or `spiece.model` in the folder the caller names, in the checkpoint's folder, or in
   `google/umt5-xxl/` beside the checkpoint (the Wan release layout);
3. the local Hugging Face cache of google/umt5-xxl (downloading only when the caller allows it).

In a folder `tokenizer.json` is preferred: it is the file TurboDiffusion's `AutoTokenizer` loads. Both files
give the same ids, except for characters missing from the vocabulary when the tokenizer.json was converted
without byte fallback (it then yields <unk> where SentencePiece spells out the UTF-8 bytes).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import ftfy
import torch

from .checkpoint_io import CheckpointError

TEXT_LEN = 512
HF_TOKENIZER_REPO = "google/umt5-xxl"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
SPIECE_TENSOR_KEY = "spiece_model"


def clean_prompt(text: str) -> str:
    """TurboDiffusion's "whitespace" cleaning of one prompt."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer:
    """Prompts → `(ids, mask)` of shape [B, text_len]: cleaned, EOS appended, truncated, zero-padded."""

    def __init__(
        self, encode: Callable[[str], list[int]], vocab_size: int, eos_id: int, pad_id: int, source: str
    ) -> None:
        self._encode = encode
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.source = source

    @classmethod
    def from_sentencepiece(cls, model_proto: bytes, source: str) -> PromptTokenizer:
        """From the bytes of a serialized SentencePiece model (`spiece.model` or ComfyUI's `spiece_model`)."""
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as error:
            raise CheckpointError(f"{source}: not a valid SentencePiece model ({error})") from error
        if processor.eos_id() < 0:
            raise CheckpointError(f"{source}: the SentencePiece model defines no EOS piece; it is not umT5's")
        pad_id = processor.pad_id() if processor.pad_id() >= 0 else 0
        return cls(processor.encode, processor.get_piece_size(), processor.eos_id(), pad_id, source)

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTokenizer:
        """From a `spiece.model` (SentencePiece) or a `tokenizer.json` (Hugging Face tokenizers) file."""
        path = Path(path)
        if path.name.endswith(".json"):
            return cls._from_tokenizer_json(path)
        return cls.from_sentencepiece(path.read_bytes(), str(path))

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> PromptTokenizer:
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({error})") from error
        eos_id = backend.token_to_id("</s>")
        if eos_id is None:
            raise CheckpointError(f"{path}: the tokenizer has no '</s>' token; it is not umT5's tokenizer")
        pad_id = backend.token_to_id("<pad>")
        return cls(
            lambda text: backend.encode(text, add_special_tokens=False).ids,
            backend.get_vocab_size(with_added_tokens=True),
            eos_id,
            0 if pad_id is None else pad_id,
            str(path),
        )

    def token_ids(self, prompt: str, text_len: int = TEXT_LEN) -> list[int]:
        """Ids of one cleaned prompt with EOS last, at most `text_len` long (as HF truncation keeps EOS)."""
        return self._encode(clean_prompt(prompt))[: text_len - 1] + [self.eos_id]

    def __call__(self, prompts: Sequence[str], text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompt to tokenize: give a list of at least one prompt")
        ids = torch.full((len(prompts), text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), text_len), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.token_ids(prompt, text_len)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


def resolve_tokenizer(
    spiece_tensor: torch.Tensor | None,
    search_paths: Sequence[Path],
    *,
    allow_download: bool = False,
    hf_cache_dir: str | Path | None = None,
) -> PromptTokenizer:
    """The umT5 tokenizer from the first place that has one (see the module docstring).

    `search_paths` are folders to look into for the files of `TOKENIZER_FILES`, or tokenizer files themselves.
    """
    if spiece_tensor is not None:
        return PromptTokenizer.from_sentencepiece(
            spiece_tensor.cpu().numpy().tobytes(), f"the checkpoint's '{SPIECE_TENSOR_KEY}' tensor"
        )
    for folder in search_paths:
        if folder.is_file():
            return PromptTokenizer.from_file(folder)
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return PromptTokenizer.from_file(folder / name)
    cached = _hugging_face_file(allow_download, hf_cache_dir)
    if cached is not None:
        return PromptTokenizer.from_file(cached)
    searched = ", ".join(str(folder) for folder in search_paths) or "(no folder)"
    raise CheckpointError(
        "No umT5 tokenizer found. Looked for: (1) a 'spiece_model' tensor inside the checkpoint (ComfyUI's "
        f"umt5_xxl_*.safetensors files carry one); (2) tokenizer.json or spiece.model in {searched}; "
        f"(3) {HF_TOKENIZER_REPO} in the local Hugging Face cache. Fix: use ComfyUI's "
        f"umt5_xxl_fp16.safetensors, or put spiece.model or tokenizer.json of {HF_TOKENIZER_REPO} (the Wan "
        "release ships them in google/umt5-xxl/) beside the checkpoint or in a folder given as tokenizer=, "
        "or allow the download."
    )


def _hugging_face_file(allow_download: bool, cache_dir: str | Path | None) -> Path | None:
    from huggingface_hub import hf_hub_download

    for name in TOKENIZER_FILES:
        try:
            return Path(
                hf_hub_download(
                    HF_TOKENIZER_REPO, name, cache_dir=cache_dir, local_files_only=not allow_download
                )
            )
        except OSError:  # not cached, offline, or the hub refused: try the next file, then give up
            continue
    return None
