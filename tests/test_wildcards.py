"""Variants and wildcards expand into the prompt axis (issue 13, part 5): each combination is its
own task with a stable id and its literal text in the PNG and the manifest; unknown or empty
wildcards are file:line errors at validate time; resume renders only what is missing."""

import json
import os
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from sdbatch.jobs import JobError, load_job
from sdbatch.plan import plan_job
from sdbatch.runner import Options, Reporter, run_job


def job_with_wildcards(tmp_path: Path, prompt: str, animals: str = "cat\ndog\n# a comment\n\nfox\n") -> Path:
    (tmp_path / "wild").mkdir(exist_ok=True)
    (tmp_path / "wild" / "animal.txt").write_text(animals)
    job = tmp_path / "job.yaml"
    job.write_text(
        textwrap.dedent(f"""
        name: w
        wildcards: wild
        prompt: "{prompt}"
        seed: 1
    """)
    )
    return job


def render(batch):
    return [(Image.new("RGB", (32, 32)), None) for _ in batch]


def test_variants_and_a_wildcard_file_expand_to_every_combination_with_stable_ids(tmp_path):
    job = job_with_wildcards(tmp_path, "a {red|blue} {circle|square} __animal__")
    plan = plan_job(load_job(job), tmp_path / "out")
    prompts = [t.recipe.prompt for t in plan.tasks]
    assert len(prompts) == len(set(prompts)) == 12
    assert set(prompts) == {
        f"a {c} {s} {a}" for c in ("red", "blue") for s in ("circle", "square") for a in ("cat", "dog", "fox")
    }
    again = plan_job(load_job(job), tmp_path / "out")
    assert [t.id for t in again.tasks] == [t.id for t in plan.tasks]  # ids from the literal text: stable


def test_the_literal_text_is_what_the_manifest_and_png_carry_and_resume_renders_only_the_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_with_wildcards(tmp_path, "{red|blue} __animal__")
    out = tmp_path / "out"
    assert run_job(load_job(job), Options(output=out), Reporter(), render=render).exit_code == 0
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["prompt"] for e in lines) == sorted(
        f"{c} {a}" for c in ("red", "blue") for a in ("cat", "dog", "fox")
    )
    with Image.open(out / lines[0]["file"]) as im:
        assert json.loads(im.text["sdbatch"])["task"]["prompt"] == lines[0]["prompt"]
        assert im.text["parameters"].startswith(lines[0]["prompt"] + "\n")
    # lose two images and their lines, as a killed run would
    for e in lines[:2]:
        (out / e["file"]).unlink()
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines[2:]))
    rendered = []

    def counting(batch):
        rendered.extend(t.recipe.prompt for t in batch)
        return render(batch)

    assert run_job(load_job(job), Options(output=out), Reporter(), render=counting).exit_code == 0
    assert sorted(rendered) == sorted(e["prompt"] for e in lines[:2])


@pytest.mark.parametrize(
    "prompt, animals, message",
    [
        ("a __nope__", "cat\n", "unknown wildcard __nope__"),
        ("a __animal__", "# only a comment\n\n", "holds no values"),
        ("a __../job__", "cat\n", "unknown wildcard"),
    ],
)
def test_an_unknown_or_empty_wildcard_is_a_file_line_error(tmp_path, prompt, animals, message):
    job = job_with_wildcards(tmp_path, prompt, animals)
    with pytest.raises(JobError, match=message) as e:
        load_job(job)
    assert "job.yaml:4: prompt:" in str(e.value)


@pytest.mark.parametrize(
    "prompt, make, message",
    [
        # a glob and a nested name reach the same files as a direct name, under the same limits
        ("a __*__", lambda w: (w / "zero.txt").symlink_to("/dev/zero"), "zero.txt is not a regular file"),
        (
            "a __animal__",
            lambda w: ((w / "animal.txt").write_text("cat __zero__\n"), (w / "zero.txt").symlink_to("/dev/zero")),
            "zero.txt is not a regular file",
        ),
        (
            "a __*__",
            lambda w: ((w / "big.txt").touch(), os.truncate(w / "big.txt", 20 << 20)),
            "big.txt is larger than 16 MB",
        ),
        ("a __animal__", lambda w: (w / "animal.txt").write_text("cat __ghost__\n"), "unknown wildcard __ghost__"),
        # no name leads out of the folder
        (
            "a __../wild2/*__",
            lambda w: ((w.parent / "wild2").mkdir(), (w.parent / "wild2" / "x.txt").write_text("x\n")),
            "matches no file",
        ),
        ("a __*__", lambda w: (w / "animal.txt").write_text("# nothing\n"), "holds no values"),
    ],
    ids=["glob-to-dev-zero", "nested-to-dev-zero", "glob-to-huge", "nested-unknown", "glob-outside", "glob-all-empty"],
)
def test_globs_and_nested_wildcards_meet_the_limits_of_named_ones(tmp_path, prompt, make, message):
    """`__*__` and a wildcard named inside a wildcard file were read by the library itself: a link
    to /dev/zero took 19 GB in `validate`, `__../x/*__` read files outside the folder."""
    job = job_with_wildcards(tmp_path, prompt)
    make(tmp_path / "wild")
    with pytest.raises(JobError, match=message) as e:
        load_job(job)
    assert "job.yaml:4: prompt:" in str(e.value)


def test_globs_and_nested_wildcards_expand_from_the_folder(tmp_path):
    job = job_with_wildcards(tmp_path, "a __c*__", animals="x\n")
    (tmp_path / "wild" / "colour.txt").write_text("red\n__shade__\n")
    (tmp_path / "wild" / "shade.txt").write_text("pale\ndark\n")
    (tmp_path / "wild" / "sub").mkdir()
    (tmp_path / "wild" / "sub" / "c.txt").write_text("blue\n")  # sub/c: c* does not match it
    prompts = sorted(t.recipe.prompt for t in plan_job(load_job(job), tmp_path / "o").tasks)
    assert prompts == ["a dark", "a pale", "a red"]


def test_plain_and_a1111_prompts_pass_through_untouched(tmp_path):
    text = "a (red:1.2) [cat:dog:5] [a|b] circle, BREAK night"
    job = job_with_wildcards(tmp_path, text)
    assert [t.recipe.prompt for t in plan_job(load_job(job), tmp_path / "o").tasks] == [text]


def test_random_prompts_are_drawn_once_and_recorded_like_random_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wild").mkdir()
    (tmp_path / "wild" / "animal.txt").write_text("\n".join(f"animal{i}" for i in range(50)))
    job = tmp_path / "job.yaml"
    job.write_text('wildcards: wild\nprompt: {random: 4, from: "a {red|blue} __animal__"}\nseed: [1, 2]\n')
    out = tmp_path / "out"
    assert load_job(job).size() == 8
    assert run_job(load_job(job), Options(output=out), Reporter(), render=render).exit_code == 0
    recorded = json.loads((out / "randoms.json").read_text())
    assert len(recorded["run0.prompt"]) == 4
    first = plan_job(load_job(job), out)
    assert len(first.done) == 8 and not first.todo  # the same draws again: nothing left to render
    prompts = {t.recipe.prompt for t in first.tasks}
    assert len(prompts) == 4 and all(p.startswith(("a red animal", "a blue animal")) for p in prompts)
    (out / "randoms.json").unlink()  # without the record the draws are new: another set of prompts
    assert {t.recipe.prompt for t in plan_job(load_job(job), out).tasks} != prompts  # 1 in ~10^6 to be equal


def test_random_prompts_are_distinct_while_there_are_enough_to_pick_from():
    from sdbatch.jobs.fields import RandomPrompts

    choices = RandomPrompts(3, ("a", "b", "c"))
    assert choices.pick([5, 5, 5]) == ["c", "a", "b"]  # 5 % 3 = 2, then the next free ones
    assert choices.pick([5, 5, 5, 5]) == ["c", "a", "b", "c"]  # more draws than prompts: repeats
