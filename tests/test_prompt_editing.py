"""A1111 prompt editing (`[from:to:when]`, `[to:when]`, `[from::when]`) and alternation (`[a|b]`):
each image's conditioning changes at the step A1111 changes it, per image, inside a batch whose
images have different schedules (and different chunk counts at different steps).

A1111's rule (prompt_parser.reconstruct_cond_batch): at sampling step s, counted from 0 over the
steps actually run, an image uses the first schedule entry whose end step is >= s. So with
`[red circle:blue square:3]` steps 0..3 see "red circle" and step 4 on "blue square"; `[red|blue]`
(schedule ends 1, 2, 3, ...) gives red, red, blue, red, blue, ...
"""

import dataclasses

import pytest
import torch
from conftest import make_tiny
from helpers import request

from sdbatch.pipeline import Pipeline
from sdbatch.pipeline.guidance import GuidanceRows, context_at
from sdbatch.tokenizer import Tokenizer, bundled_tokenizer

W, H = 32, 24  # latents 4 x 3
LONG = " ".join(f"word{k}" for k in range(90))  # two 77-token chunks


def ours() -> Pipeline:
    return Pipeline(make_tiny(), Tokenizer(bundled_tokenizer(), "bundled"))


def req(prompt: str, seed: int = 1, **fields):
    fields = {"steps": 8, "sampler": "euler_a", "cfg": 5.0, **fields}
    return request(prompt, seed=seed, width=W, height=H, **fields)


def record_steps(monkeypatch, pipe: Pipeline) -> list[torch.Tensor]:
    """The latents after each sampler step (through the start's after-step hook)."""
    seen: list[torch.Tensor] = []
    original = pipe._start

    def start(requests, plan, draw, *rest):
        begin = original(requests, plan, draw, *rest)
        inner = begin.after_step

        def after_step(i, x):
            x = inner(i, x) if inner else x
            seen.append(x.clone())
            return x

        return dataclasses.replace(begin, after_step=after_step)

    monkeypatch.setattr(pipe, "_start", start)
    return seen


def record_contexts(monkeypatch, pipe: Pipeline) -> list[torch.Tensor]:
    """The context of every UNet call, in order."""
    seen: list[torch.Tensor] = []
    unet = pipe.unet

    def recording(x, t, context):
        seen.append(context)
        return unet(x, t, context)

    monkeypatch.setattr(pipe, "unet", recording)
    return seen


def which(context: torch.Tensor, named: dict[str, torch.Tensor]) -> str:
    found = [name for name, c in named.items() if torch.equal(context, c)]
    assert len(found) == 1, found
    return found[0]


# ----------------------------------------------------------------------------------------------------
# the schedule lookup itself


def test_context_at_follows_a1111():
    a, b, c = (torch.full((1, 77, 4), float(v)) for v in range(3))
    schedule = [(3, a), (5, b), (8, c)]
    assert [int(context_at(schedule, s)[0, 0, 0]) for s in range(10)] == [0, 0, 0, 0, 1, 1, 2, 2, 2, 0]


def test_groups_change_only_at_end_steps():
    a, b, long = torch.zeros(1, 77, 4), torch.ones(1, 77, 4), torch.ones(1, 154, 4)
    rows = GuidanceRows([1.0, 1.0], [([(2, a), (6, long)], None), ([(6, b)], None)], "cpu")
    first = rows.groups_at(0)
    assert [len(g[0]) for g in first] == [2]  # both 77 tokens: one UNet call
    assert rows.groups_at(2) is first
    later = rows.groups_at(3)
    assert sorted(g[2].shape[1] for g in later) == [77, 154]  # now one row per length
    assert rows.groups_at(5) is later


# ----------------------------------------------------------------------------------------------------
# rendering


def test_batch_with_different_schedules_equals_each_alone():
    pipe = ours()
    requests = [
        req("[red circle:blue square:3]", seed=3),
        req("a green triangle", seed=4),
        req(f"[a cat:{LONG}:2]", seed=5, negative="[ugly|blurry]"),  # one chunk, then two
    ]
    batched = pipe.render(requests)
    alone = [pipe.render([r])[0] for r in requests]
    for b, a in zip(batched, alone, strict=True):
        assert b.ok and a.ok
        torch.testing.assert_close(b.latents, a.latents, rtol=1e-4, atol=1e-4)  # batched float rounding
        worst = max(abs(x - y) for x, y in zip(b.image.tobytes(), a.image.tobytes(), strict=True))
        assert worst <= 1
    # and the editing matters: not the image of either prompt alone
    red, blue = pipe.render([req("red circle", seed=3), req("blue square", seed=3)])
    assert not torch.equal(batched[0].latents, red.latents)
    assert not torch.equal(batched[0].latents, blue.latents)


def test_switching_image_follows_the_first_prompt_up_to_the_switch(monkeypatch):
    pipe = ours()
    steps = record_steps(monkeypatch, pipe)
    pipe.render([req("[red circle:blue square:3]")])
    edited, steps[:] = list(steps), []
    pipe.render([req("red circle")])
    plain = list(steps)
    assert len(edited) == len(plain) == 8
    for i in range(4):  # steps 0..3 use "red circle" (A1111: step <= end step 3)
        assert torch.equal(edited[i], plain[i]), f"step {i}"
    assert not torch.equal(edited[4], plain[4])


def test_fraction_when_and_one_sided_forms(monkeypatch):
    pipe = ours()
    contexts = record_contexts(monkeypatch, pipe)
    named = {t: pipe.encode_prompt(t) for t in ("a red", "a blue", "a ", "a  cat")}
    for prompt, expected in [
        ("a [red:blue:0.5]", ["a red"] * 5 + ["a blue"] * 3),  # int(0.5 * 8) = 4: steps 0..4
        ("a [blue:2]", ["a "] * 3 + ["a blue"] * 5),
        ("a [red::6] cat", ["a red cat"] * 7 + ["a  cat"]),
    ]:
        named.setdefault(expected[0], pipe.encode_prompt(expected[0]))
        contexts.clear()
        pipe.render([req(prompt, cfg=1.0)])
        assert [which(c, named) for c in contexts] == expected, prompt


def test_alternation_switches_each_step(monkeypatch):
    pipe = ours()
    contexts = record_contexts(monkeypatch, pipe)
    red, blue = pipe.encode_prompt("a red"), pipe.encode_prompt("a blue")
    named = {"red": red, "blue": blue}
    pipe.render([req("a [red|blue]", steps=6, cfg=1.0)])
    # schedule ends 1, 2, ..., 6 hold red, blue, red, ...; step s takes the first end >= s
    assert [which(c, named) for c in contexts] == ["red", "red", "blue", "red", "blue", "red"]


def test_negative_prompt_follows_its_schedule_too(monkeypatch):
    pipe = ours()
    contexts = record_contexts(monkeypatch, pipe)
    cond = pipe.encode_prompt("a cat")
    named = {"red": pipe.encode_prompt("red"), "blue": pipe.encode_prompt("blue")}
    pipe.render([req("a cat", negative="[red|blue]", steps=4)])
    assert all(torch.equal(c[0:1], cond) for c in contexts)  # one call per step: cond row, uncond row
    assert [which(c[1:2], named) for c in contexts] == ["red", "red", "blue", "red"]


def test_img2img_walks_the_full_schedule_from_its_first_step(monkeypatch):
    """A1111 computes schedules over all `steps` and counts from 0 at the first step run: 10 steps
    at strength 0.6 run 6 steps, the first with the entry ending at step >= 0."""
    from test_pipeline import gradient_image

    pipe = ours()
    contexts = record_contexts(monkeypatch, pipe)
    named = {t: pipe.encode_prompt(t) for t in ("a red", "a blue")}
    init = gradient_image(1).resize((W, H))
    pipe.render([req("a [red:blue:2]", steps=10, cfg=1.0, init_image=init, strength=0.6)])
    assert [which(c, named) for c in contexts] == ["a red"] * 3 + ["a blue"] * 3


def test_a_prompt_without_editing_is_grouped_once(monkeypatch):
    """No editing: one schedule entry per row, the rows concatenated once before sampling, the UNet
    given that same tensor at every step (as before schedules existed)."""
    pipe = ours()
    contexts = record_contexts(monkeypatch, pipe)
    pipe.render([req("a red circle", seed=2), req("a blue square", seed=3)])
    assert len(contexts) == 8
    assert all(c is contexts[0] for c in contexts)


def test_an_edit_to_the_same_text_changes_no_bit():
    pipe = ours()
    plain, edited, alternated = (
        pipe.render([req(p, seed=7)])[0] for p in ("red circle", "[red circle:red circle:3]", "[red circle|red circle]")
    )
    assert plain.image.tobytes() == edited.image.tobytes() == alternated.image.tobytes()
    assert torch.equal(plain.latents, edited.latents) and torch.equal(plain.latents, alternated.latents)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "ddpm", "euler"])
def test_every_sampler_switches_at_the_same_step(monkeypatch, sampler):
    pipe = ours()
    contexts = record_contexts(monkeypatch, pipe)
    named = {t: pipe.encode_prompt(t) for t in ("a red", "a blue")}
    pipe.render([req("a [red:blue:1]", steps=4, cfg=1.0, sampler=sampler)])
    assert [which(c, named) for c in contexts] == ["a red"] * 2 + ["a blue"] * 2
