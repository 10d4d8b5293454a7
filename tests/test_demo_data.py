"""The demo dataset, its tokenizer and its judge: what the shipped demo model is trained and tested on."""

import random
from collections import Counter

import pytest
import torch

from sdbatch.demo import data
from sdbatch.demo import tokenizer as demo_tokenizer
from sdbatch.demo.judge import background, judge
from sdbatch.tokenizer import load_tokenizer


def test_samples_are_deterministic_and_varied():
    image, caption, scene = data.sample(123)
    again = data.sample(123)
    assert image.tobytes() == again[0].tobytes() and caption == again[1] and scene == again[2]
    scenes = [data.sample(s)[2] for s in range(400)]
    assert len(set(scenes)) > 300
    assert {s.shape for s in scenes} == set(data.SHAPES) and len(data.SHAPES) >= 3
    assert {s.colour for s in scenes} == set(data.COLOURS) and len(data.COLOURS) >= 6
    assert {s.size for s in scenes} == set(data.SIZES) and {s.position for s in scenes} == set(data.POSITIONS)
    assert all(s.colour != s.background for s in scenes)
    assert len({data.sample(s)[1].split()[0] for s in range(200)}) > 1  # several phrasings


def test_captions_say_what_is_drawn():
    for seed in range(200):
        _, caption, scene = data.sample(seed)
        words = caption.replace(",", " ").split()
        assert scene.colour in words and scene.shape in words
        if "background" in words or " on " in f" {caption} ":
            assert scene.background in words


@pytest.mark.parametrize("side", [64, 32])
def test_judge_reads_the_datasets_own_renders(side):
    rng = random.Random(5)
    verdicts = Counter()
    for _ in range(300):
        scene = data.random_scene(rng)
        image = scene.render(side)
        colour, shape = judge(image)
        verdicts["colour"] += colour == scene.colour
        verdicts["shape"] += shape == scene.shape
        verdicts["background"] += background(image) == scene.background
    assert verdicts["colour"] >= 297 and verdicts["background"] == 300, verdicts
    assert verdicts["shape"] >= (294 if side == 64 else 270), verdicts


def test_judge_sees_nothing_in_a_plain_image():
    assert judge(
        data.Scene("circle", "red", "blue", "small", "in the middle").render().resize((1, 1)).resize((64, 64))
    ) == (None, None)


def test_demo_tokenizer_has_every_caption_word_whole(tmp_path):
    folder = demo_tokenizer.write(tmp_path / "tokenizer")
    (tmp_path / "model.safetensors").write_bytes(b"")
    tok = load_tokenizer(tmp_path / "model.safetensors")  # found next to the checkpoint
    assert tok.source == str(folder)
    assert len(tok) == len(demo_tokenizer.build()[0]) < 1000
    for word in data.vocabulary():
        assert len(tok.tokens(word)) == 1, word
    assert tok.tokens(",") == tok.tokens(" , ")
    ids = tok.encode("a red circle on a blue background")
    assert ids[0] == tok.bos and ids.tolist().count(tok.eos) == 77 - 8  # 7 words, then end + padding
    assert tok.eos == len(tok) - 1 and tok.bos == len(tok) - 2
    assert len(tok.tokens("a zebra-striped hexagon!")) > 4  # unknown words fall back to byte pieces
    assert torch.equal(tok.encode("a red circle"), tok.encode("A  RED circle"))


def test_demo_tokenizer_is_deterministic(tmp_path):
    a = demo_tokenizer.write(tmp_path / "a")
    b = demo_tokenizer.write(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
