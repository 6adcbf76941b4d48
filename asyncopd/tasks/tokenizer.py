"""A character-level tokenizer built locally (no hub), saved in Hugging Face format.

Every printable ASCII character is one token; ``<pad>`` = 0 and ``<eos>`` = 1.
Saved with ``save_pretrained`` it loads through ``AutoTokenizer.from_pretrained``
in transformers and in vLLM alike, which is what the demo models and the test
fixtures ship with.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["PAD", "EOS", "UNK", "build_char_tokenizer", "save_char_tokenizer"]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
_CHARS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for char in _CHARS:
        vocab[char] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    tokenizer.model_max_length = 4096
    return tokenizer


def save_char_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(str(path))
    return tokenizer
