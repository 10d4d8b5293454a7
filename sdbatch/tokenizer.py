"""The CLIP BPE tokenizer, found on disk without ever touching the network.

A user with only a single-file checkpoint has no tokenizer files, so we look in order:
  1. a diffusers folder's `tokenizer/`
  2. a `tokenizer/` folder next to a single-file checkpoint
  3. `<weights dir>/tokenizer/` ($SDBATCH_WEIGHTS, default ./weights)
  4. the Hugging Face cache, if openai/clip-vit-large-patch14 (or an SD 1.x repo) is already there
  5. the CLIP vocabulary bundled with sdbatch (OpenAI's bpe_simple_vocab_16e6.txt.gz, MIT licence)
"""

import contextlib
import gzip
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import CLIPTokenizer

from .checkpoints import CheckpointError, open_model, weights_dir
from .errors import InputError

if TYPE_CHECKING:
    from .addons.embeddings import EmbeddingLookup

BUNDLED_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# (repo, file) pairs whose cached copy is the SD 1.x tokenizer; looked up in the cache, never fetched
HF_CACHE_CANDIDATES = (
    ("openai/clip-vit-large-patch14", "vocab.json"),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/vocab.json"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer/vocab.json"),
    ("CompVis/stable-diffusion-v1-4", "tokenizer/vocab.json"),
)


COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
PLACEHOLDER = 0  # the id under an embedding's vectors, as in A1111 ("!"); the text encoder's fixes replace it


class TokenizerError(InputError):
    """No usable tokenizer; the message says where one was looked for and where to put it."""


@dataclass(frozen=True)
class Chunk:
    """One text-encoder pass: [BOS, tokens..., EOS padding..., EOS], each token's emphasis weight, and
    the embeddings in it: (position in `ids`, vectors [n, width]) whose vectors replace the token
    embeddings of ids[position : position + n] (A1111's PromptChunk.fixes, here counting the BOS)."""

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class Tokenizer:
    hf: CLIPTokenizer
    source: str  # where it came from, for logs and `check-model`

    @property
    def bos(self) -> int:
        return self.hf.bos_token_id

    @property
    def eos(self) -> int:
        return self.hf.eos_token_id

    def __len__(self) -> int:
        return len(self.hf)

    def tokens(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens (the pipeline chunks long prompts itself)."""
        return self.hf(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def comma(self) -> int | None:
        """The id of "," as a word (`,</w>`), where chunking may break a long prompt; None if absent."""
        return self.hf.get_vocab().get(",</w>")

    def chunks(
        self,
        pieces: Iterable[tuple[str, float]],
        length: int = 75,
        backtrack: int = COMMA_BACKTRACK,
        embeddings: "EmbeddingLookup | None" = None,
    ) -> list[Chunk]:
        """Weighted text pieces (`prompts.parse_attention`'s output) cut into chunks of `length`
        tokens as A1111's `tokenize_line` does, so that long prompts condition the same way:
        each piece is tokenized on its own; when a chunk is full and its last comma is at most
        `backtrack` tokens back, the words after that comma move to the next chunk rather than
        being split from their phrase; a ("BREAK", -1) piece ends a chunk; an empty prompt is one
        chunk. Padding is the end token (SD 1.x's pad token) with weight 1.

        Where an embedding's name (found in `embeddings`) appears in a piece's tokens, its n vectors
        take n positions with the piece's weight, in one chunk: a new chunk starts if they do not fit.
        As in A1111, the comma backtrack moves those positions to the next chunk but leaves the
        embedding's fix behind: its vectors stay where they were, over the old chunk's padding, and
        the moved positions keep the placeholder id. A1111's images are made that way."""
        done: list[Chunk] = []
        ids: list[int] = []
        weights: list[float] = []
        fixes: list[tuple[int, torch.Tensor]] = []  # positions counted without the BOS
        last_comma = -1

        def close() -> None:
            nonlocal ids, weights, fixes, last_comma
            pad = length - len(ids)
            done.append(
                Chunk(
                    [self.bos, *ids, *[self.eos] * pad, self.eos],
                    [1.0, *weights, *[1.0] * pad, 1.0],
                    [(1 + at, vectors) for at, vectors in fixes],
                )
            )
            ids, weights, fixes, last_comma = [], [], [], -1

        for text, weight in pieces:
            if text == "BREAK" and weight == -1:
                close()
                continue
            tokens = self.tokens(text)
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma:
                    last_comma = len(ids)
                elif backtrack and len(ids) == length and last_comma != -1 and length - last_comma <= backtrack:
                    cut = last_comma + 1
                    moved = ids[cut:], weights[cut:]
                    ids, weights = ids[:cut], weights[:cut]
                    close()
                    ids, weights = moved
                if len(ids) == length:
                    close()
                match = embeddings.find(tokens, position) if embeddings is not None else None
                if match is None:
                    ids.append(token)
                    weights.append(weight)
                    position += 1
                    continue
                n = len(match.vectors)
                if n > length:
                    raise ValueError(
                        f"embedding {match.name!r} has {n} vectors, more than the {length} of a prompt chunk"
                    )
                if len(ids) + n > length:
                    close()
                fixes.append((len(ids), match.vectors))
                ids += [PLACEHOLDER] * n
                weights += [weight] * n
                position += match.length
        if ids or not done:
            close()
        return done

    def encode(self, text: str, length: int = 77) -> torch.Tensor:
        """[BOS, tokens..., EOS, EOS padding] of exactly `length` ids, as SD 1.x was trained.
        Raises ValueError rather than silently cutting a prompt that does not fit."""
        ids = [self.bos, *self.tokens(text), self.eos]
        if len(ids) > length:
            raise ValueError(f"prompt is {len(ids) - 2} tokens, more than the {length - 2} that fit: {text[:60]!r}")
        return torch.tensor(ids + [self.eos] * (length - len(ids)), dtype=torch.long)


def _from_folder(folder: Path) -> CLIPTokenizer:
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise TokenizerError(f"{folder}: a tokenizer folder needs vocab.json and merges.txt (found {present})")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise TokenizerError(f"{folder}: cannot read the tokenizer files ({e})") from None


def _hf_cache_folder() -> Path | None:
    from huggingface_hub import try_to_load_from_cache  # a transformers dependency; reads the cache only

    for repo, filename in HF_CACHE_CANDIDATES:
        vocab = try_to_load_from_cache(repo, filename)
        if isinstance(vocab, str):
            folder = Path(vocab).parent
            if (folder / "merges.txt").is_file():
                return folder
    return None


def _byte_alphabet() -> list[str]:
    """The values of OpenAI's bytes_to_unicode(), in its order: the printable bytes as themselves, then
    the other 68 bytes as chr(256), chr(257), ... (so that BPE never sees whitespace or control bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


@lru_cache(maxsize=1)
def bundled_tokenizer() -> CLIPTokenizer:
    """Build the 49,408-id CLIP vocabulary the way OpenAI's simple_tokenizer does: 256 byte tokens,
    the same with `</w>`, 48,894 merges, then <|startoftext|> and <|endoftext|>."""
    try:
        data = resources.files("sdbatch").joinpath("data", BUNDLED_VOCAB).read_bytes()
    except FileNotFoundError:
        raise TokenizerError(_not_found_message()) from None
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = _byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    # model_max_length 77 as in SD's tokenizer_config.json: other tools (diffusers) pad to it
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges, model_max_length=77)


def _not_found_message() -> str:
    return (
        "no CLIP tokenizer found. Put vocab.json and merges.txt (from openai/clip-vit-large-patch14 or an SD 1.x "
        f"diffusers folder's tokenizer/) into {weights_dir() / 'tokenizer'}/, or reinstall sdbatch: its bundled "
        f"{BUNDLED_VOCAB} is missing"
    )


def load_tokenizer(model_path: str | Path | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer for a model, from the first place in the module docstring's list that has one.

    `vocab_size` (the text encoder's) guards against a tokenizer from another model family."""
    tokenizer = _find(Path(model_path) if model_path is not None else None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise TokenizerError(
            f"tokenizer from {tokenizer.source} has {len(tokenizer)} tokens but the text encoder only "
            f"{vocab_size}: it belongs to another model"
        )
    return tokenizer


def _find(model_path: Path | None) -> Tokenizer:
    candidates = []
    if model_path is not None and model_path.exists():
        with contextlib.suppress(CheckpointError):  # a folder that is no model has no tokenizer of its own
            candidates.append(open_model(model_path).tokenizer_folder())
    candidates.append(weights_dir() / "tokenizer")
    for folder in candidates:
        if folder.is_dir():
            return Tokenizer(_from_folder(folder), str(folder))
    cached = _hf_cache_folder()
    if cached is not None:
        return Tokenizer(_from_folder(cached), f"Hugging Face cache ({cached})")
    return Tokenizer(bundled_tokenizer(), f"bundled CLIP vocabulary ({BUNDLED_VOCAB})")
