"""The CLIP tokenizer is always found on disk, in the documented order, and never downloaded."""

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from sdbatch import tokenizer as tok_module
from sdbatch.checkpoints import save_checkpoint
from sdbatch.tokenizer import TokenizerError, bundled_tokenizer, load_tokenizer

PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bundled_vocabulary_matches_clip():
    tok = load_tokenizer()
    assert tok.source.startswith("bundled CLIP vocabulary")
    assert len(tok) == 49408
    assert (tok.bos, tok.eos) == (49406, 49407)
    ids = tok.encode("a photo of a cat")
    assert ids.shape == (77,) and ids.dtype == torch.long
    assert ids[:7].tolist() == PHOTO_OF_A_CAT
    assert ids[7:].tolist() == [49407] * 70  # SD 1.x pads with the end token


def test_case_and_spacing_do_not_change_tokens():
    tok = load_tokenizer()
    assert tok.tokens("A  Photo of a CAT") == PHOTO_OF_A_CAT[1:-1]


def test_too_long_prompt_is_an_error_not_a_silent_cut():
    tok = load_tokenizer()
    with pytest.raises(ValueError, match="prompt is 80 tokens, more than the 75 that fit"):
        tok.encode("cat " * 80)
    assert tok.encode("cat " * 75)[-1] == 49407


def tiny_vocab_folder(folder: Path) -> Path:
    """A 514-token byte-level vocabulary with no merges: clearly not the bundled one."""
    folder.mkdir(parents=True)
    alphabet = tok_module._byte_alphabet()
    vocab = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def test_weights_dir_tokenizer_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(tmp_path / "weights"))
    tiny_vocab_folder(tmp_path / "weights" / "tokenizer")
    tok = load_tokenizer()
    assert tok.source == str(tmp_path / "weights" / "tokenizer")
    assert len(tok) == 514
    # no merges: 'a' is byte token 64 (the alphabet starts at '!'), 'b</w>' its end-of-word twin 256 + 65
    assert tok.tokens("ab") == [64, 256 + 65]


def test_tokenizer_next_to_a_checkpoint_wins_over_weights_dir(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(tmp_path / "weights"))
    bundled_tokenizer().save_pretrained(tmp_path / "weights" / "tokenizer")
    path = save_checkpoint(tiny, tmp_path / "mine" / "model.safetensors")
    tiny_vocab_folder(tmp_path / "mine" / "tokenizer")
    assert load_tokenizer(path).source == str(tmp_path / "mine" / "tokenizer")
    assert load_tokenizer(tmp_path / "elsewhere.safetensors").source == str(tmp_path / "weights" / "tokenizer")


def test_diffusers_folder_tokenizer_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(tmp_path / "weights"))
    bundled_tokenizer().save_pretrained(tmp_path / "weights" / "tokenizer")
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    tiny_vocab_folder(tmp_path / "sd" / "tokenizer")
    assert load_tokenizer(tmp_path / "sd").source == str(tmp_path / "sd" / "tokenizer")


def fake_hf_cache(root: Path, repo: str, subfolder: str = "") -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("abc123")
    snapshot = repo_dir / "snapshots" / "abc123" / subfolder
    tiny_vocab_folder(snapshot)
    return snapshot


@pytest.mark.parametrize(
    ("repo", "subfolder"), [("openai/clip-vit-large-patch14", ""), ("runwayml/stable-diffusion-v1-5", "tokenizer")]
)
def test_hugging_face_cache_is_used_when_already_there(tmp_path, monkeypatch, repo, subfolder):
    import huggingface_hub.constants

    snapshot = fake_hf_cache(Path(huggingface_hub.constants.HF_HUB_CACHE), repo, subfolder)
    tok = load_tokenizer()
    assert tok.source == f"Hugging Face cache ({snapshot})"
    assert len(tok) == 514


def test_incomplete_tokenizer_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(tmp_path))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"needs vocab.json and merges.txt \(found vocab.json\)"):
        load_tokenizer()


def test_tokenizer_of_another_model_is_refused():
    with pytest.raises(TokenizerError, match="has 49408 tokens but the text encoder only 1000"):
        load_tokenizer(vocab_size=1000)


def test_missing_bundled_vocabulary_says_where_to_put_files(monkeypatch):
    monkeypatch.setattr(tok_module, "BUNDLED_VOCAB", "missing.txt.gz")
    bundled_tokenizer.cache_clear()
    try:
        with pytest.raises(TokenizerError, match=r"no CLIP tokenizer found. Put vocab.json and merges.txt .* into"):
            load_tokenizer()
    finally:
        bundled_tokenizer.cache_clear()


def test_saved_bundled_tokenizer_reloads_identically(tmp_path):
    bundled_tokenizer().save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "a watercolour painting of a fox, 4k, trending on artstation!!"
    assert again(text)["input_ids"] == bundled_tokenizer()(text)["input_ids"]
