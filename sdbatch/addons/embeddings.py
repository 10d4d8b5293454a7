"""Textual-inversion embeddings: the files users download, and where a prompt calls for them.

An embedding is n learned vectors in the text encoder's token-embedding space. A1111 (whose prompts
users bring) triggers one by its FILE NAME: where the tokens of the name appear in a prompt, its n
vectors replace them (`modules/textual_inversion/textual_inversion.py`, `EmbeddingDatabase`). The
name inside a file (A1111's "name", a diffusers token such as "<cat-toy>") is not used, as in A1111.

Files: A1111 `.pt` `{"string_to_param": {"*": tensor[n, 768]}, "name", "step", ...}`; `.safetensors`
holding one tensor (kohya writes `emb_params`); diffusers `learned_embeds.bin/.safetensors`
`{token: tensor[768] or [n, 768]}`. Everything is read through `checkpoints.read`, whose restricted
unpickler never runs code from a file. Checking a file reads headers only and needs no torch, so that
validating a job can refuse an SD 2.x or SDXL embedding before anything is loaded.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..checkpoints import read
from ..checkpoints.read import CheckpointError, TensorRef, WeightsFile, read_weights

if TYPE_CHECKING:
    import torch

MAX_VECTORS = 75  # one prompt chunk: an embedding never straddles two, so it cannot be longer
A1111_KEY = "string_to_param"
SDXL_KEYS = ("clip_l", "clip_g")
# what an embedding of a given width was trained for, so that a refusal can say which model it needs
FAMILIES = {
    768: "an SD 1.x embedding",
    1024: "an SD 2.x embedding",
    1280: "an SDXL embedding",
    2048: "an SDXL embedding",
}
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")  # A1111 can also hide an embedding in an image


class EmbeddingError(CheckpointError):
    """An embedding file that cannot be used with this model; the message names the file and why."""


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Embedding:
    name: str  # the file stem: the word that triggers it in a prompt, as in A1111
    path: Path
    vectors: "torch.Tensor"  # [n, width] float32 on the CPU


def check_embedding(path: str | Path, width: int, max_vectors: int = MAX_VECTORS) -> tuple[int, int]:
    """(vectors, width) of an embedding file, from its header alone and without torch, or
    EmbeddingError saying why this model cannot use it. Job validation reads the (small) file
    whole with `read_embedding` instead, which applies these checks and refuses NaN too."""
    return _locate(Path(path), width, max_vectors)[1]


def read_embedding(path: str | Path, width: int, max_vectors: int = MAX_VECTORS) -> Embedding:
    """The embedding in `path` as float32 vectors [n, width], after the checks of `check_embedding`."""
    import torch

    path = Path(path)
    ref, (n, w) = _locate(path, width, max_vectors)
    try:
        tensor = ref.load()
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    vectors = tensor.detach().to(torch.float32, copy=True).reshape(n, w)  # a copy: never a view of the file
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: the embedding holds NaN or infinite values; the file is damaged")
    return Embedding(path.stem, path, vectors)


def _locate(path: Path, width: int, max_vectors: int) -> tuple[TensorRef, tuple[int, int]]:
    """The one tensor that is the embedding, and its (vectors, width), checked against the model."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise EmbeddingError(
            f"{path}: embeddings stored inside images are not supported; use the .pt or .safetensors file"
        )
    try:
        tensors = _open(path).tensors
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    sdxl = [k for k in SDXL_KEYS if k in tensors]
    if sdxl:
        raise EmbeddingError(f"{path}: an SDXL embedding (it holds {' and '.join(sdxl)}); sdbatch supports SD 1.x only")
    nested = [k for k in tensors if k.startswith(f"{A1111_KEY}.")]
    candidates = nested or list(tensors)
    if len(candidates) != 1:
        shown = ", ".join(candidates[: read.SHOW])
        raise EmbeddingError(f"{path}: holds {len(candidates)} tensors ({shown}); an embedding file holds exactly one")
    ref = tensors[candidates[0]]
    if len(ref.shape) not in (1, 2):
        raise EmbeddingError(f"{path}: the embedding has shape {list(ref.shape)}, not [vectors, width]")
    n, w = (1, ref.shape[0]) if len(ref.shape) == 1 else ref.shape
    if w != width:
        family = f": {FAMILIES[w]}" if w in FAMILIES else ""
        raise EmbeddingError(f"{path}: this embedding is {w} wide{family}; this model's text encoder is {width} wide")
    if n == 0:
        raise EmbeddingError(f"{path}: the embedding holds no vectors")
    if n > max_vectors:
        raise EmbeddingError(
            f"{path}: the embedding has {n} vectors, more than the {max_vectors} that fit in one prompt chunk"
        )
    return ref, (n, w)


def _open(path: Path) -> WeightsFile:
    """`read_weights`, which lists top-level tensors only, plus A1111's `.pt` layout, whose tensor
    sits one level down (as `string_to_param.*`). The pickle is scanned by read's restricted
    unpickler (names and shapes, no code run) and loaded by its `torch.load(weights_only=True)`."""
    try:
        return read_weights(path)
    except CheckpointError:
        nested = _a1111_tensors(path)
        if nested is None:
            raise
        return nested


def _a1111_tensors(path: Path) -> WeightsFile | None:
    """A1111's nested tensors, or None when the file is not that (read_weights' error then stands)."""
    with path.open("rb") as f:
        head = f.read(4)
    zip_format = head.startswith(b"PK\x03\x04")
    try:
        obj = read._scan_zip(path) if zip_format else read._scan_legacy(path)
    except Exception:  # refused, truncated, corrupted: read_weights has already said which, in its words
        return None
    params = obj.get(A1111_KEY) if isinstance(obj, dict) else None
    if not isinstance(params, dict):
        return None
    shapes = {str(k): v.shape for k, v in params.items() if isinstance(v, read._Tensor)}
    if not shapes:
        return None
    opened: list[dict] = []

    def load(key: str) -> Any:
        if not opened:
            opened.append(read._torch_load(path, zip_format))
        return opened[0][A1111_KEY][key]

    return WeightsFile(path, {f"{A1111_KEY}.{k}": TensorRef(s, partial(load, k)) for k, s in shapes.items()}, {})


class Match(NamedTuple):
    """An embedding found in a token sequence: its name, its vectors, how many tokens its name took."""

    name: str
    vectors: "torch.Tensor"
    length: int


class EmbeddingLookup:
    """Embeddings by the token ids of their names, as A1111's `EmbeddingDatabase.ids_lookup`: a name
    is tokenized like the prompt (no start/end tokens), and a prompt calls for the embedding wherever
    those ids appear in its tokens. Candidates are kept per first id, longest name first, so that
    "bad_hands" wins over "bad" where both match; among names that tokenize alike the first given wins."""

    def __init__(self, embeddings: Mapping[str, "torch.Tensor"], tokenize: Callable[[str], Sequence[int]]):
        self._by_first: dict[int, list[tuple[tuple[int, ...], str, torch.Tensor]]] = {}
        for name, vectors in embeddings.items():
            ids = tuple(tokenize(name))
            if not ids:
                raise EmbeddingError(f"embedding {name!r}: its name has no tokens, so no prompt can call it; rename it")
            self._by_first.setdefault(ids[0], []).append((ids, name, vectors))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)  # a stable sort keeps the first given first

    def find(self, tokens: Sequence[int], offset: int) -> Match | None:
        """The embedding whose name's ids start at `tokens[offset]` (the longest such), or None."""
        for ids, name, vectors in self._by_first.get(tokens[offset], ()):
            if tuple(tokens[offset : offset + len(ids)]) == ids:
                return Match(name, vectors, len(ids))
        return None
