"""A tiny SentencePiece tokenizer trained on the spot, laid out as umT5's (pad 0, EOS 1, unk 2, no BOS, byte
fallback), for random-weight text encoders in the tests and the end-to-end benchmark."""

from __future__ import annotations

import io
from collections.abc import Iterable


def train_unigram_tokenizer(corpus: Iterable[str], vocab_size: int) -> bytes:
    """The serialized unigram model trained on `corpus` (a fraction of a second for a few hundred lines)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()
