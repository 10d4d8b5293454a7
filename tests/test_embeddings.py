"""Textual-inversion embeddings as A1111 uses them: the three file formats, refusals of files that do
not fit an SD 1.x model, trigger lookup by file name (longest first), placement in chunks, and the
text encoder's output against transformers' CLIP with the vectors spliced in by hand."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPORT, make_tiny
from helpers import max_diff
from safetensors.torch import save_file
from test_models import carried

from sdbatch.addons.embeddings import (
    EmbeddingError,
    EmbeddingLookup,
    check_embedding,
    read_embedding,
)
from sdbatch.checkpoints import CheckpointError
from sdbatch.errors import EXIT_BAD_INPUT
from sdbatch.prompts import parse_attention
from sdbatch.tokenizer import PLACEHOLDER, Tokenizer, bundled_tokenizer

TOL = 1e-5
TOK = Tokenizer(bundled_tokenizer(), "bundled")
BOS, EOS = TOK.bos, TOK.eos
CAT, DOG, COMMA = TOK.tokens("cat")[0], TOK.tokens("dog")[0], TOK.tokens(",")[0]
WIDTH = 32  # the tiny model's text encoder


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# files, written here the way each tool writes them


def a1111_pt(path: Path, vec: torch.Tensor, legacy: bool = False) -> Path:
    """A1111's `Embedding.save`: a dict of strings, numbers and a Parameter (as trained)."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(vec.clone())},
        "name": "not-the-trigger",
        "step": 1500,
        "sd_checkpoint": "a9263745",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(data, path, _use_new_zipfile_serialization=not legacy)
    return path


def kohya_safetensors(path: Path, vec: torch.Tensor) -> Path:
    save_file({"emb_params": vec.contiguous()}, str(path))
    return path


def diffusers_bin(path: Path, vec: torch.Tensor) -> Path:
    torch.save({"<my-style>": vec.clone()}, path)
    return path


def diffusers_safetensors(path: Path, vec: torch.Tensor) -> Path:
    save_file({"<my-style>": vec.contiguous()}, str(path))
    return path


WRITERS = {
    "a1111.pt": a1111_pt,
    "a1111-legacy.pt": lambda p, v: a1111_pt(p, v, legacy=True),
    "kohya.safetensors": kohya_safetensors,
    "learned_embeds.bin": diffusers_bin,
    "learned_embeds.safetensors": diffusers_safetensors,
}


@pytest.mark.parametrize("file", list(WRITERS))
def test_every_format_loads_the_same_vectors(tmp_path, file):
    vec = vectors(3)
    path = WRITERS[file](tmp_path / file, vec)
    assert check_embedding(path, WIDTH) == (3, WIDTH)
    emb = read_embedding(path, WIDTH)
    assert emb.name == path.stem and emb.path == path  # the file name triggers it, not the name inside
    assert emb.vectors.dtype == torch.float32 and not isinstance(emb.vectors, torch.nn.Parameter)
    assert torch.equal(emb.vectors, vec)


def test_one_vector_diffusers_token_and_half_precision(tmp_path):
    vec = vectors(1)[0]  # diffusers stores a one-vector concept as [width]
    assert check_embedding(diffusers_bin(tmp_path / "one.bin", vec), WIDTH) == (1, WIDTH)
    assert torch.equal(read_embedding(tmp_path / "one.bin", WIDTH).vectors, vec[None])
    half = vectors(2).half()
    emb = read_embedding(kohya_safetensors(tmp_path / "half.safetensors", half), WIDTH)
    assert emb.vectors.dtype == torch.float32 and torch.equal(emb.vectors, half.float())


def test_check_reads_headers_without_torch(tmp_path):
    paths = [WRITERS[f](tmp_path / f, vectors(4)) for f in ("a1111.pt", "a1111-legacy.pt", "kohya.safetensors")]
    sd2 = kohya_safetensors(tmp_path / "sd2.safetensors", vectors(2, 1024))
    code = (
        "import sys\n"
        "from sdbatch.addons.embeddings import EmbeddingError, check_embedding\n"
        f"print([check_embedding(p, {WIDTH}) for p in {[str(p) for p in paths]!r}])\n"
        "try:\n"
        f"    check_embedding({str(sd2)!r}, 768)\n"
        "except EmbeddingError as e:\n"
        "    print(e)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        str([(4, WIDTH)] * 3),
        f"{sd2}: this embedding is 1024 wide: an SD 2.x embedding; this model's text encoder is 768 wide",
    ]


# ----------------------------------------------------------------------------------------------------
# refusals: one clear line each, exit code 2


@pytest.mark.parametrize(
    ("width", "family"), [(1024, "an SD 2.x embedding"), (1280, "an SDXL embedding"), (2048, "an SDXL embedding")]
)
def test_other_model_families_are_named(tmp_path, width, family):
    path = kohya_safetensors(tmp_path / "other.safetensors", vectors(2, width))
    message = f"is {width} wide: {family}; this model's text encoder is 768 wide"
    with pytest.raises(EmbeddingError, match=message):
        check_embedding(path, 768)
    with pytest.raises(EmbeddingError, match=message):
        read_embedding(path, 768)


def test_sdxl_file_with_clip_l_and_clip_g_is_refused(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)}, str(path))
    with pytest.raises(EmbeddingError, match="an SDXL embedding \\(it holds clip_l and clip_g\\); sdbatch supports SD"):
        check_embedding(path, 768)


def test_errors_are_bad_input():
    assert issubclass(EmbeddingError, CheckpointError)
    assert EmbeddingError("x").exit_code == EXIT_BAD_INPUT


def assert_refused(path: Path, match: str) -> None:
    for call in (check_embedding, read_embedding):
        with pytest.raises(EmbeddingError, match=match) as e:
            call(path, WIDTH)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_empty_and_truncated_files_are_refused(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_refused(tmp_path / "empty.pt", "the file is empty")
    for name in ("a1111.pt", "kohya.safetensors"):
        data = WRITERS[name](tmp_path / name, vectors(8)).read_bytes()
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) - 200])
        assert_refused(cut, "truncated")
    # a pre-1.6 torch file keeps its tensors after the pickle, unlisted: only reading them finds the cut
    data = a1111_pt(tmp_path / "legacy.pt", vectors(8), legacy=True).read_bytes()
    (tmp_path / "cut-legacy.pt").write_bytes(data[: len(data) - 200])
    with pytest.raises(EmbeddingError, match="truncated or corrupted"):
        read_embedding(tmp_path / "cut-legacy.pt", WIDTH)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, legacy):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = {"string_to_param": {"*": torch.zeros(2, WIDTH)}, "name": Payload()}
    torch.save(data, tmp_path / "evil.pt", _use_new_zipfile_serialization=not legacy)
    assert_refused(tmp_path / "evil.pt", "refused to load: the pickle holds Python objects other than tensors")
    assert not marker.exists()


def test_vector_counts_are_checked(tmp_path):
    assert_refused(kohya_safetensors(tmp_path / "none.safetensors", torch.zeros(0, WIDTH)), "holds no vectors")
    assert check_embedding(kohya_safetensors(tmp_path / "max.safetensors", vectors(75)), WIDTH) == (75, WIDTH)
    assert_refused(
        a1111_pt(tmp_path / "many.pt", vectors(76)), "has 76 vectors, more than the 75 that fit in one prompt chunk"
    )


def test_files_that_are_no_single_embedding_are_refused(tmp_path):
    path = tmp_path / "two.safetensors"
    save_file({"a": vectors(1), "b": vectors(1)}, str(path))
    assert_refused(path, "holds 2 tensors \\(a, b\\); an embedding file holds exactly one")
    torch.save({"string_to_param": {"*": vectors(1), "other": vectors(1)}}, tmp_path / "terms.pt")
    assert_refused(tmp_path / "terms.pt", "holds 2 tensors")
    save_file({"emb_params": torch.zeros(2, 3, WIDTH)}, str(tmp_path / "cube.safetensors"))
    assert_refused(tmp_path / "cube.safetensors", "shape \\[2, 3, 32\\], not \\[vectors, width\\]")
    save_file({"emb_params": torch.full((2, WIDTH), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(EmbeddingError, match="NaN"):
        read_embedding(tmp_path / "nan.safetensors", WIDTH)
    (tmp_path / "preview.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert_refused(tmp_path / "preview.png", "inside images are not supported")


# ----------------------------------------------------------------------------------------------------
# trigger lookup and chunks, as A1111's EmbeddingDatabase and tokenize_line


def lookup(**named: torch.Tensor) -> EmbeddingLookup:
    return EmbeddingLookup(named, TOK.tokens)


def chunks(text: str, embeddings: EmbeddingLookup | None):
    return TOK.chunks(parse_attention(text), embeddings=embeddings)


def content(ids: list[int]) -> list[int]:
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) == 77
    return [t for t in ids[1:-1] if t != EOS]


def test_find_matches_the_name_tokens_longest_first():
    bad, bad_hands = vectors(1, seed=1), vectors(2, seed=2)
    tokens = TOK.tokens("bad_hands, bad, hands")
    assert TOK.tokens("bad_hands")[: len(TOK.tokens("bad"))] == TOK.tokens("bad")  # a real prefix
    for db in (lookup(bad=bad, bad_hands=bad_hands), lookup(bad_hands=bad_hands, bad=bad)):
        first = db.find(tokens, 0)
        assert first is not None and first.name == "bad_hands" and first.length == 3
        assert first.vectors is bad_hands
        second = db.find(tokens, 4)
        assert second is not None and (second.name, second.length) == ("bad", 1)
        assert db.find(tokens, 3) is None and db.find(tokens, 6) is None  # a comma, "hands"
    # tokenized like the prompt: case and spacing do not matter, other words do not match
    db = lookup(EasyNegative=vectors(2))
    assert db.find(TOK.tokens("easynegative"), 0) is not None
    assert db.find(TOK.tokens("EasyNegativeV2"), 0) is None


def test_embedding_takes_its_vectors_places_with_the_piece_weight():
    vec = vectors(3)
    (chunk,) = chunks("a photo in (mystyle:1.3), cat", lookup(mystyle=vec))
    a_photo_in = TOK.tokens("a photo in")
    assert content(chunk.ids) == [*a_photo_in, *[PLACEHOLDER] * 3, COMMA, CAT]
    start = 1 + len(a_photo_in)
    assert [(at, v) for at, v in chunk.fixes] == [(start, vec)]
    assert chunk.weights[start : start + 3] == [1.3] * 3
    assert chunk.weights[start + 3 : start + 5] == [1.0, 1.0]
    # without the lookup the name is plain words
    (plain,) = chunks("a photo in (mystyle:1.3), cat", None)
    assert content(plain.ids) == TOK.tokens("a photo in mystyle, cat") and plain.fixes == []


def test_embedding_that_does_not_fit_starts_a_new_chunk():
    vec = vectors(3)
    first, second = chunks("cat " * 73 + "mystyle dog", lookup(mystyle=vec))
    assert content(first.ids) == [CAT] * 73 and first.fixes == []
    assert content(second.ids) == [PLACEHOLDER] * 3 + [DOG]
    assert len(second.fixes) == 1 and second.fixes[0][0] == 1 and second.fixes[0][1] is vec
    # two places left: still too few; three: it fits at the end
    (whole,) = chunks("cat " * 72 + "mystyle", lookup(mystyle=vec))
    assert content(whole.ids) == [CAT] * 72 + [PLACEHOLDER] * 3 and whole.fixes[0][0] == 73


def test_comma_backtrack_leaves_the_fix_behind_as_a1111_does():
    """A1111 moves the tokens after the last comma to the next chunk but not the chunk's fixes: the
    vectors stay over the old chunk's padding and the moved placeholders are plain id 0 tokens."""
    vec = vectors(3)
    text = "cat " * 60 + ", (mystyle:1.2) " + "dog " * 12  # 60 + 1 + 3 + 11 fill the chunk; a dog overflows
    first, second = chunks(text, lookup(mystyle=vec))
    assert content(first.ids) == [CAT] * 60 + [COMMA]
    assert [at for at, _ in first.fixes] == [62] and first.fixes[0][1] is vec
    assert first.weights[62:65] == [1.0] * 3  # padding weights
    assert content(second.ids) == [PLACEHOLDER] * 3 + [DOG] * 12
    assert second.fixes == [] and second.weights[1:4] == [1.2] * 3


def test_too_long_embedding_for_the_chunk_is_an_error():
    with pytest.raises(ValueError, match="'mystyle' has 10 vectors, more than the 8 of a prompt chunk"):
        TOK.chunks([("mystyle", 1.0)], length=8, embeddings=lookup(mystyle=vectors(10)))


def test_name_without_tokens_is_refused():
    with pytest.raises(EmbeddingError, match="no tokens"):
        lookup(**{" ": vectors(1)})


# ----------------------------------------------------------------------------------------------------
# the text encoder, against transformers' CLIP with the vectors spliced in by the test


def transformers_with_splices(model, rows: torch.Tensor, splices: list[list[tuple[int, torch.Tensor]]]):
    """transformers' CLIPTextModel (our weights), its token embeddings overwritten by hand where the
    test says, as A1111's EmbeddingsWithFixes wraps the token embedding."""
    twin = carried(model, "text_encoder")
    token_embedding = twin.get_input_embeddings()

    def splice(module, inputs, out):
        out = out.clone()
        for row, row_splices in enumerate(splices):
            for at, vec in row_splices:
                out[row, at : at + len(vec)] = vec
        return out

    handle = token_embedding.register_forward_hook(splice)
    try:
        with torch.no_grad():
            return twin(input_ids=rows).last_hidden_state
    finally:
        handle.remove()


def test_prompt_with_embeddings_matches_transformers_on_spliced_token_embeddings():
    model = make_tiny()
    style, neg = vectors(3, seed=5), vectors(2, seed=6)
    db = lookup(mystyle=style, EasyNegative=neg)
    text = "a photo in mystyle, " + "cat " * 70 + ", easynegative dog"  # the second chunk holds one too
    result = chunks(text, db)
    assert [len(c.fixes) for c in result] == [1, 1]
    ids = torch.tensor([c.ids for c in result])
    with torch.no_grad():
        ours = model.text_encoder(ids, fixes=[c.fixes for c in result])

    # the oracle's rows and splice positions, found by the test itself in the plain tokens
    words = TOK.tokens(text)
    name, other = TOK.tokens("mystyle"), TOK.tokens("easynegative")
    at = next(i for i in range(len(words)) if words[i : i + len(name)] == name)
    row0 = words[:at] + [0] * 3 + words[at + 2 : at + 2 + 69]  # 3 words, 3 vectors, the comma, 68 cats
    rest = words[at + 2 + 69 :]
    at2 = next(i for i in range(len(rest)) if rest[i : i + len(other)] == other)
    row1 = rest[:at2] + [0] * 2 + rest[at2 + 2 :]
    rows = torch.tensor([[BOS, *r, *[EOS] * (76 - len(r))] for r in (row0, row1)])
    assert torch.equal(ids, rows)
    want = transformers_with_splices(model, rows, [[(1 + at, style)], [(1 + at2, neg)]])
    diff = max_diff(ours, want)
    REPORT.append(f"embeddings: max |ours - transformers with spliced token embeddings| = {diff:.2e}")
    assert diff <= TOL
    # the vectors matter: other vectors, or the plain placeholder token, give another output
    assert max_diff(ours, transformers_with_splices(model, rows, [[(1 + at, -style)], [(1 + at2, neg)]])) > 1e-2
    with torch.no_grad():
        assert max_diff(ours, model.text_encoder(ids)) > 1e-2


def test_encoder_without_fixes_is_unchanged_and_bad_fixes_are_refused():
    model = make_tiny()
    ids = torch.tensor([c.ids for c in chunks("a photo of a cat", None)] * 2)
    with torch.no_grad():
        plain = model.text_encoder(ids)
        assert torch.equal(model.text_encoder(ids, 1, None), plain)
        assert torch.equal(model.text_encoder(ids, fixes=[[], []]), plain)
        with pytest.raises(ValueError, match="fixes for 1 rows, but the batch has 2"):
            model.text_encoder(ids, fixes=[[]])
        for at in (0, 75):  # the BOS, or reaching the last position
            with pytest.raises(ValueError, match="does not fit"):
                model.text_encoder(ids, fixes=[[(at, vectors(2))], []])
        with pytest.raises(ValueError, match="text encoder 32 wide"):
            model.text_encoder(ids, fixes=[[(1, vectors(2, 768))], []])
