"""A CLIP-format BPE tokenizer for the demo's caption vocabulary (vocab.json + merges.txt).

Same conventions as SD's: the 256 byte-level symbols, the same with `</w>`, merges, then
<|startoftext|> and <|endoftext|> (also the padding token). Merges are learned with the `tokenizers`
library on the caption words, so every caption word is one token; any other text still encodes,
as byte-level pieces, so a prompt outside the vocabulary never fails.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from ..tokenizer import _byte_alphabet
from .data import vocabulary


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build every word whole (deterministic: a fixed, sorted word list)."""
    model = HFTokenizer(models.BPE(end_of_word_suffix="</w>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=100_000, end_of_word_suffix="</w>", show_progress=False)
    model.train_from_iterator(words, trainer)
    merges = json.loads(model.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = learn_merges(words or vocabulary())
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write(folder: Path) -> Path:
    """vocab.json, merges.txt and a tokenizer_config.json (max length 77) that CLIPTokenizer loads."""
    vocab, merges = build()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
