"""A CLIP-format BPE tokenizer for the demo's caption vocabulary (vocab.json + merges.txt).

Same conventions as SD's: the 256 byte-level symbols, the same with `</w>`, merges, then
<|startoftext|> and <|endoftext|> (also the padding token). Merges are learned on the caption words
until every caption word is one token; any other text still encodes, as byte-level pieces, so a
prompt outside the vocabulary never fails.
"""

import json
from itertools import pairwise
from pathlib import Path

from ..tokenizer import _byte_alphabet
from .data import vocabulary


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build every word whole: repeatedly merge the most frequent adjacent pair,
    ties broken by the smallest pair, so the result depends on the word list alone (the
    `tokenizers` trainer breaks ties in hash order, which made ids change between runs)."""
    spelled = [[*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in spelled:
            for pair in pairwise(symbols):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for k, symbols in enumerate(spelled):
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[k] = merged


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
