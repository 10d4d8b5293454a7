"""Finding add-ons by name in their folders, and what a task records of the ones it uses.

A LoRA is named by its file's stem (`<lora:add_detail:0.6>` -> `add_detail.safetensors`), as in
A1111; an embedding is triggered by its file's stem appearing in a prompt. Folders, first found
wins: the job's own (`loras:` / `embeddings:` keys), `$SDBATCH_WEIGHTS/loras` (default
./weights/loras), then the checkout's `weights/loras`; the same with `embeddings`. Subfolders are
searched too; two files of one name in one folder are refused as ambiguous, never picked at random.

What enters a task's id is each add-on's sha256 (its contents, not its name) and weights, so a
LoRA file replaced by another of the same name renders new images and never passes for the old.
Torch-free, except `check_lora`, which builds the model's shapes on the meta device.
"""

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from ..checkpoints import SHIPPED_WEIGHTS, CheckpointError, read_weights, weights_dir
from ..checkpoints.hashing import addnet_sha256, file_sha256
from ..errors import InputError
from ..hires import model_stem
from ..models.configs import SDConfig
from ..prompts import parse_attention, prompt_schedule
from ..prompts.networks import strip_networks
from ..text import printable

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
MAX_FILES = 100_000  # entries one add-on folder is searched for, at most
SHORT = 12  # hex digits A1111 writes in `Lora hashes` / `TI hashes`


class AddonError(CheckpointError):
    """An add-on that cannot be used (missing, ambiguous, damaged, for another model); `kind`
    ("lora" or "embedding") and `name` say which, so a job can point at the line naming it."""

    def __init__(self, message: str, kind: str = "", name: str = ""):
        super().__init__(message)
        self.kind, self.name = kind, name


@dataclass(frozen=True)
class LoraUse:
    """One LoRA a task merges: its name, file, sha256 (the id), A1111's short hash, weights."""

    name: str
    path: str
    sha256: str
    short: str
    te: float
    unet: float


@dataclass(frozen=True)
class EmbeddingUse:
    name: str
    path: str
    sha256: str
    short: str


@dataclass(frozen=True)
class UpscalerUse:
    """The upscaler model a hires fix runs (`hires_upscaler` naming a file, not a latent mode)."""

    name: str
    path: str
    sha256: str


@dataclass(frozen=True)
class Addons:
    """The add-ons of one task, resolved to files."""

    loras: tuple[LoraUse, ...] = ()
    embeddings: tuple[EmbeddingUse, ...] = ()
    upscaler: UpscalerUse | None = None

    def __bool__(self) -> bool:
        return bool(self.loras or self.embeddings or self.upscaler)

    def id_data(self) -> list:
        """What the task id adds: contents and weights (a LoRA's name does not change pixels; an
        embedding's does, since the name is what triggers it; an upscaler's contents)."""
        return (
            [["lora", u.sha256, u.te, u.unet] for u in self.loras]
            + [["embedding", u.name, u.sha256] for u in self.embeddings]
            + ([["upscaler", self.upscaler.sha256]] if self.upscaler else [])
        )

    def record(self) -> dict[str, Any]:
        """Our manifest line and PNG chunk: each add-on's name, full sha256, weights and where it
        was (`rerun` looks there first, then in the add-on folders by name)."""
        out: dict[str, Any] = {}
        if self.loras:
            out["loras"] = [
                {"name": u.name, "sha256": u.sha256, "te": u.te, "unet": u.unet, "path": u.path} for u in self.loras
            ]
        if self.embeddings:
            out["embeddings"] = [{"name": u.name, "sha256": u.sha256, "path": u.path} for u in self.embeddings]
        if self.upscaler:
            u = self.upscaler
            out["upscaler"] = {"name": u.name, "sha256": u.sha256, "path": u.path}
        return out

    def a1111(self) -> dict[str, str]:
        """A1111's `Lora hashes` and `TI hashes` (names without ':' and ',', as A1111 writes them)."""
        out = {}
        if self.loras:
            out["Lora hashes"] = ", ".join(f"{_a1111_name(u.name)}: {u.short}" for u in self.loras)
        if self.embeddings:
            out["TI hashes"] = ", ".join(f"{_a1111_name(u.name)}: {u.short}" for u in self.embeddings)
        return out


def _a1111_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


Given = Path | Iterable[Path] | None  # folders a job or an image names


@dataclass(frozen=True)
class Folders:
    """Where add-ons are looked for, in order."""

    loras: tuple[Path, ...]
    embeddings: tuple[Path, ...]
    upscalers: tuple[Path, ...] = ()

    @classmethod
    def of(cls, loras: "Given" = None, embeddings: "Given" = None, upscalers: "Given" = None) -> "Folders":
        """The job's folders (None, one or several) first, then the weights folders."""
        bases = tuple(dict.fromkeys((weights_dir(), SHIPPED_WEIGHTS)))

        def first(given: Given) -> list[Path]:
            return [] if given is None else [given] if isinstance(given, Path) else list(given)

        return cls(
            tuple(dict.fromkeys([*first(loras), *(b / "loras" for b in bases)])),
            tuple(dict.fromkeys([*first(embeddings), *(b / "embeddings" for b in bases)])),
            tuple(dict.fromkeys([*first(upscalers), *(b / "upscalers" for b in bases)])),
        )


@dataclass
class Library:
    """Add-on files by name, listed once per folder; resolves recipes to the add-ons they use."""

    folders: Folders
    _listed: dict[tuple[Path, tuple[str, ...]], dict[str, list[Path]]] = field(default_factory=dict)
    _resolved: dict[tuple, "Addons"] = field(default_factory=dict)  # (loras, prompt, negative, ...) -> add-ons
    _names: dict[str, Path | None] | None = None  # every embedding name, listed on first use
    _triggered: dict[tuple[str, ...], tuple["EmbeddingUse", ...]] = field(default_factory=dict)
    _hashes: dict[Path, tuple[str, str]] = field(default_factory=dict)  # path -> (sha256, A1111's short hash)
    # the model's tokenizer (text -> ids), made on first use: matching embeddings by tokens, as A1111
    tokenize: Callable[[], Callable[[str], list[int]]] | None = None
    _tokens: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _tokenizer: Callable[[str], list[int]] | None = None  # `tokenize()`'s result, made on first use

    def _files(self, folder: Path, suffixes: tuple[str, ...]) -> dict[str, list[Path]]:
        key = (folder, suffixes)
        if key not in self._listed:
            self._listed[key] = _list(folder, suffixes)
        return self._listed[key]

    def _find(self, name: str, folders: Iterable[Path], suffixes: tuple[str, ...], kind: str) -> Path:
        looked = []
        what = "LoRA" if kind == "lora" else kind
        for folder in folders:
            found = self._files(folder, suffixes).get(name, [])
            if len(found) > 1:
                shown = ", ".join(printable(str(p)) for p in found[:3])
                raise AddonError(f"{what} {printable(name)!r} is ambiguous: {shown}; rename or remove one", kind, name)
            if found:
                return found[0]
            looked.append(printable(str(folder)))
        near = [n for f in folders for n in self._files(f, suffixes) if n.lower() == name.lower()]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise AddonError(
            f"{what} {printable(name)!r} not found{hint}; looked for {printable(name)}"
            f"{{{','.join(suffixes)}}} in {', '.join(looked)}",
            kind,
            name,
        )

    def lora(self, name: str) -> Path:
        return self._find(name, self.folders.loras, LORA_SUFFIXES, "lora")

    def upscaler(self, name: str) -> UpscalerUse:
        """The upscaler model named `name` (its file's stem; A1111's own names such as `R-ESRGAN
        4x+` map to the file A1111 saves them as), hashed."""
        path = self._find(model_stem(name), self.folders.upscalers, UPSCALER_SUFFIXES, "upscaler")
        try:
            return UpscalerUse(name, str(path), file_sha256(path))
        except OSError as e:
            raise AddonError(f"upscaler {printable(name)!r}: {printable(str(e))}", "upscaler", name) from None

    def embedding_names(self) -> dict[str, Path | None]:
        """Every embedding name in the folders (None for an ambiguous one: an error if triggered)."""
        if self._names is None:
            self._names = {}
            for folder in self.folders.embeddings:
                for name, paths in self._files(folder, EMBEDDING_SUFFIXES).items():
                    self._names.setdefault(name, paths[0] if len(paths) == 1 else None)
        return self._names

    def addons(
        self,
        loras: tuple[tuple[str, float, float], ...],
        prompt: str,
        negative: str,
        steps: int = 1,
        emphasis: str = "original",
    ) -> Addons:
        """The add-ons of a recipe: its LoRAs (`Recipe.loras()`), and the embeddings that trigger
        in its prompt or negative prompt (as the pipeline reads them, for `steps` and `emphasis`).
        AddonError for a missing, ambiguous or unreadable file."""
        key = (loras, prompt, negative, steps, emphasis)
        if key not in self._resolved:
            uses = tuple(self._lora_use(*lora) for lora in loras)
            pieces = tuple(p for text in (strip_networks(prompt), negative) for p in _pieces(text, steps, emphasis))
            self._resolved[key] = Addons(uses, self._embeddings(pieces))
        return self._resolved[key]

    def _lora_use(self, name: str, te: float, unet: float) -> LoraUse:
        path = self.lora(name)
        if path not in self._hashes:
            try:
                read_weights(path)  # a damaged file is said to be one before A1111's hash reads its header
                self._hashes[path] = (file_sha256(path), a1111_hash(path)[:SHORT])
            except (OSError, CheckpointError) as e:
                raise AddonError(f"LoRA {printable(name)!r}: {printable(str(e))}", "lora", name) from None
        return LoraUse(name, str(path), *self._hashes[path], te, unet)

    def _embeddings(self, pieces: tuple[str, ...]) -> tuple[EmbeddingUse, ...]:
        """The embeddings that trigger in the text pieces (prompt-editing parts, emphasis runs), by
        A1111's rule: the tokens of the embedding's name appear among a piece's tokens. Names found
        as text first (ignoring case and whitespace: every token match is one), then by tokens,
        with the model's tokenizer (`tokenize`: loaded only when some name is found as text)."""
        if pieces in self._triggered:
            return self._triggered[pieces]
        text = flat("\n".join(pieces))
        uses = []
        for name, path in sorted(self.embedding_names().items()):
            if flat(name) and flat(name) in text and self._in_tokens(name, pieces):
                if path is None:
                    self._find(name, self.folders.embeddings, EMBEDDING_SUFFIXES, "embedding")  # raises: ambiguous
                    continue
                try:
                    sha = file_sha256(path)
                except OSError as e:
                    raise AddonError(f"embedding {printable(name)!r}: {printable(str(e))}", "embedding", name) from None
                uses.append(EmbeddingUse(name, str(path), sha, sha[:SHORT]))
        self._triggered[pieces] = tuple(uses)
        return self._triggered[pieces]

    def _in_tokens(self, name: str, pieces: tuple[str, ...]) -> bool:
        if self.tokenize is None:
            return True  # no tokenizer given: the text match stands (a superset of A1111's)
        tokens = self._tokens
        if self._tokenizer is None:
            self._tokenizer = self.tokenize()  # loaded once, when first needed
        for text in (name, *pieces):
            if text not in tokens:
                tokens[text] = tuple(self._tokenizer(text))
        wanted = tokens[name]
        return bool(wanted) and any(
            tokens[p][i : i + len(wanted)] == wanted for p in pieces for i in range(len(tokens[p]) - len(wanted) + 1)
        )


_SPACE = re.compile(r"\s+")


def _pieces(text: str, steps: int, emphasis: str) -> list[str]:
    """The runs of text the tokenizer sees one by one, as the pipeline cuts them: each prompt-editing
    part, then each emphasis run (the whole part with emphasis `none`)."""
    try:
        parts = [part for _, part in prompt_schedule(text, max(1, steps))]
    except ValueError:  # a prompt the recipe's rules refuse: its problem is reported there
        parts = [text]
    if emphasis == "none":
        return parts
    return [piece for part in parts for piece, weight in parse_attention(part) if weight != -1 or piece != "BREAK"]


def flat(text: str) -> str:
    """Text as embedding names are first looked for in it: lower case, no whitespace."""
    return _SPACE.sub("", text.lower())


def a1111_hash(path: str | Path) -> str:
    """A1111's hash of a LoRA file: the addnet hash for .safetensors, else the whole file's sha256."""
    return addnet_sha256(path) if Path(path).suffix.lower() == ".safetensors" else file_sha256(path)


def _list(folder: Path, suffixes: tuple[str, ...]) -> dict[str, list[Path]]:
    """stem -> files with one of `suffixes` under `folder` (hidden names skipped), sorted."""
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return found
    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            seen += 1
            if seen > MAX_FILES:
                raise AddonError(f"{printable(str(folder))}: more than {MAX_FILES} files; point at a smaller folder")
            path = Path(root) / name
            if not name.startswith(".") and path.suffix.lower() in suffixes and path.is_file():
                found.setdefault(path.stem, []).append(path)
    return found


# ----------------------------------------------------------------------------------------------------
# checking files against the model (at validate time: nothing is rendered with a bad add-on)


@lru_cache(maxsize=4)
def model_shapes(config: SDConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict key -> shape for a config, from a model on the meta device (no memory)."""
    from ..models import build_model

    return {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}


@lru_cache(maxsize=256)
def check_lora(path: str, sha256: str, config: SDConfig) -> str:
    """The LoRA's format name, or AddonError saying why it cannot apply to this model. Reads the
    header and key names only (`sha256` keys the cache: a changed file is checked again)."""
    from .lora import read_lora

    return read_lora(path, model_shapes(config), config.unet).format


@lru_cache(maxsize=256)
def check_embedding(path: str, sha256: str, width: int, chunk: int) -> int:
    """How many vectors the embedding has, or AddonError naming why it does not fit this model
    (its width, or more vectors than one `chunk` of the text encoder holds)."""
    from .embeddings import read_embedding

    return len(read_embedding(path, width, chunk).vectors)  # a few KB: read whole, NaN refused now


@lru_cache(maxsize=64)
def check_upscaler(path: str, sha256: str) -> str:
    """What the upscaler file is (`UpscalerInfo`, from its header), or an error saying why it is
    not an upscaler sdbatch can run (another architecture, code in a pickle, damaged)."""
    from ..upscale.files import read_upscaler

    return str(read_upscaler(path))


def check_addons(addons: Addons, config: SDConfig) -> None:
    """AddonError (naming the add-on) for any file that cannot apply to a model of `config`."""
    chunk = config.clip.max_positions - 2
    checks: list[tuple[LoraUse | EmbeddingUse | UpscalerUse, Callable[[], object]]] = [
        *((u, partial(check_lora, u.path, u.sha256, config)) for u in addons.loras),
        *((u, partial(check_embedding, u.path, u.sha256, config.clip.width, chunk)) for u in addons.embeddings),
    ]
    if addons.upscaler is not None:
        checks.append((addons.upscaler, partial(check_upscaler, addons.upscaler.path, addons.upscaler.sha256)))
    for use, check in checks:
        try:
            check()
        except AddonError:
            raise
        except InputError as e:  # the loader's CheckpointError, the upscaler's UpscalerError
            kind = "lora" if isinstance(use, LoraUse) else "upscaler" if isinstance(use, UpscalerUse) else "embedding"
            what = "LoRA" if kind == "lora" else kind
            raise AddonError(f"{what} {printable(use.name)!r}: {e}", kind, use.name) from None
