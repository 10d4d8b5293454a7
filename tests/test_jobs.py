"""Job files: expansion of lists, ranges and runs; every bad input reported with its line; fuzzing."""

import math
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdbatch.jobs import JobError, RangeError, Task, draw_randoms, load_job, parse_job, parse_range


def job(tmp_path: Path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_job(path)


def tasks_of(j, size: int = 32, model_id: str = "model-sha", randoms: dict | None = None) -> list[Task]:
    """The job's tasks with ids, as the plan makes them (the model's size and a 7.5 CFG)."""
    randoms = randoms if randoms is not None else draw_randoms(j.random_slots(), {})
    recipes = j.expand(randoms, size, 7.5)
    return [Task(i, run, r.task_id(model_id, lambda p: p), r) for i, (run, r) in enumerate(recipes)]


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(JobError) as e:
        job(tmp_path, text)
    return [str(p) for p in e.value.problems]


# -- expansion


def test_scalars_make_one_task_with_defaults(tmp_path):
    [t] = tasks_of(job(tmp_path, "prompt: a red circle\n"))
    assert (t.prompt, t.negative, t.seed, t.steps, t.sampler, t.cfg, t.karras) == (
        "a red circle",
        "",
        0,
        30,
        "euler_a",
        7.5,
        False,
    )
    assert (t.width, t.height, t.strength, t.init_image) == (32, 32, None, None)


def test_lists_form_a_cartesian_product_seed_fastest(tmp_path):
    tasks = tasks_of(job(tmp_path, "prompt: [a, b]\ncfg: [1, 7]\nseed: [5, 6, 7]\n"))
    assert len(tasks) == 12
    assert [t.seed for t in tasks[:4]] == [5, 6, 7, 5]
    assert [(t.prompt, t.cfg) for t in tasks[::3]] == [("a", 1), ("a", 7), ("b", 1), ("b", 7)]
    assert [t.index for t in tasks] == list(range(12))
    assert len({t.id for t in tasks}) == 12


def test_runs_take_defaults_and_override_them(tmp_path):
    j = job(
        tmp_path,
        """
        defaults: {steps: 12, cfg: [3, 5]}
        runs:
          - prompt: a
          - prompt: b
            cfg: 9
            seed: 1-4
        """,
    )
    tasks = tasks_of(j)
    assert [(t.run, t.prompt, t.cfg, t.steps) for t in tasks[:2]] == [(0, "a", 3, 12), (0, "a", 5, 12)]
    assert [t.seed for t in tasks if t.run == 1] == [1, 2, 3, 4]
    assert {t.cfg for t in tasks if t.run == 1} == {9}


@pytest.mark.parametrize(
    ("text", "integer", "expected"),
    [
        ("1-8", True, [1, 2, 3, 4, 5, 6, 7, 8]),
        ("1-8 (+3)", True, [1, 4, 7]),
        ("10-1 (-4)", True, [10, 6, 2]),
        ("3-12 (+1.5)", False, [3, 4.5, 6, 7.5, 9, 10.5, 12]),
        ("0.2-0.8 [4]", False, [0.2, 0.4, 0.6, 0.8]),
        ("1-10 [4]", True, [1, 4, 7, 10]),
        ("1, 5, 9-11", True, [1, 5, 9, 10, 11]),
        ("5-5", True, [5]),
        ("0.1-0.3 (+0.1)", False, [0.1, 0.2, 0.3]),
    ],
)
def test_range_syntax(text, integer, expected):
    assert parse_range(text, integer) == expected


@pytest.mark.parametrize("text", ["1-8 (0)", "1-8 (-1)", "a-b", "1.5-3", "1-", "1-3 [0]", "1,,2", "1-1e9"])
def test_bad_ranges_are_refused(text):
    with pytest.raises(RangeError):
        parse_range(text, integer=True)


def test_ranges_in_a_job_and_size_forms(tmp_path):
    j = job(tmp_path, "prompt: p\nseed: 1-3\ncfg: 3-6 (+1.5)\nsize: [[64, 32], '32x64', 32]\n")
    tasks = tasks_of(j)
    assert len(tasks) == 3 * 3 * 3
    assert {(t.width, t.height) for t in tasks} == {(64, 32), (32, 64), (32, 32)}
    assert {t.cfg for t in tasks} == {3, 4.5, 6}
    [t] = tasks_of(job(tmp_path, "prompt: p\nsize: [96, 64]\n"))  # one [w, h] pair is one size
    assert (t.width, t.height) == (96, 64)


def test_random_seeds_are_drawn_once_and_reused_when_recorded(tmp_path):
    j = job(tmp_path, "prompt: p\nseed: random [3]\n")
    slots = j.random_slots()
    assert slots == {"run0.seed": 3}
    first = tasks_of(j)
    assert len({t.seed for t in first}) == 3
    recorded = {"run0.seed": [t.seed for t in first]}
    assert [t.seed for t in tasks_of(j, randoms=recorded)] == recorded["run0.seed"]
    assert [t.id for t in tasks_of(j, randoms=recorded)] == [t.id for t in first]


def test_prompt_file_one_prompt_per_line(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\n# a comment\na blue square\n")
    tasks = tasks_of(job(tmp_path, "prompt: {file: prompts.txt}\nseed: [1, 2]\n"))
    assert [t.prompt for t in tasks] == ["a red circle"] * 2 + ["a blue square"] * 2


def test_paths_are_relative_to_the_job_file(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "sub" / "init.png")
    j = job(tmp_path, "prompt: p\ninit_image: init.png\nstrength: [0.3, 0.6]\n", name="sub/job.yaml")
    tasks = tasks_of(j, 64)
    assert tasks[0].init_image == str((tmp_path / "sub" / "init.png").resolve())
    assert [t.strength for t in tasks] == [0.3, 0.6]
    assert tasks[0].mode == "img2img"


def test_task_ids_are_stable_and_depend_on_model_and_recipe(tmp_path):
    a = tasks_of(job(tmp_path, "prompt: p\nseed: [1, 2]\n"))
    b = tasks_of(job(tmp_path, "prompt: [other, p]\nseed: [1, 2]\n"))
    assert [t.id for t in a] == [t.id for t in b[2:]]  # same recipe, same id, whatever the index
    c = tasks_of(job(tmp_path, "prompt: p\nseed: [1, 2]\n"), model_id="another-model")
    assert not {t.id for t in a} & {t.id for t in c}


def test_txt2img_ids_ignore_strength(tmp_path):
    a = tasks_of(job(tmp_path, "prompt: p\nstrength: 0.3\n"))
    b = tasks_of(job(tmp_path, "prompt: p\nstrength: 0.9\n"))
    assert a[0].id == b[0].id


# -- validation


def test_all_problems_are_reported_together_with_lines(tmp_path):
    problems = errors(
        tmp_path,
        """
        name: bad
        prompt: a red circle
        cfg_scale: 7
        seed: 1-x
        steps: 0
        sampler: eulr
        size: 100
        karras: maybe
        """,
    )
    text = "\n".join(problems)
    assert "job.yaml:4: cfg_scale: unknown key; did you mean 'cfg'?" in text
    assert "job.yaml:5: seed:" in text and "1-x" in text
    assert "job.yaml:6: steps: 0 is out of range" in text
    assert "job.yaml:7: sampler: unknown sampler 'eulr'; did you mean 'euler'?" in text
    assert "job.yaml:8: size: 100x100: each side must be a multiple of 8" in text
    assert "job.yaml:9: karras: must be true or false" in text
    assert len(problems) == 6


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("prompt: p\nprompt: q\n", 2, "prompt: given twice (first on line 1)"),
        ("prompt: p\nseed: [1, 2.5]\n", 2, "must be a whole number"),
        ("prompt: p\nstrength: 1.5\n", 2, "1.5 is out of range"),
        ("prompt: yes\n", 1, "must be text, got true"),
        ("prompt: p\ninit_image: missing.png\n", 2, "does not exist"),
        ("prompt: p\nmask: m.png\n", 2, "does not exist"),
        ("prompt: {file: nope.txt}\n", 1, "prompt file"),
        ("prompt: p\nsampler: ddim\nkarras: true\n", 3, "karras does not apply to ddim"),
        ("prompt: p\nbatch_size: [1, 2]\n", 2, "takes one value"),
        ("prompt: p\nruns:\n  - prompt: q\n", 1, "put shared values under defaults"),
        ("runs:\n  - seed: 1\n", 2, "missing: every run needs a prompt"),
        ("prompt: p\nwidth: 512\n", 2, "write size: [width, height]"),
        ("prompt: p\nsheet: {x: cfgg}\n", 2, "did you mean 'cfg'"),
        ("prompt: p\nfilename: '{nope}'\n", 2, "bad template"),
        ("prompt: p\nseed: 2-1 (+1)\n", 2, "never goes from"),
        ("prompt: p\nsteps: 1-1000000\n", 2, "100,000"),
        ("prompt: [p\n", 2, "not valid YAML"),
        ("- a\n- b\n", 1, "a job file is a mapping"),
        ("prompt: p\nsampler: dpm++ 2m karras\n", 2, "karras: true"),
        ("prompt: p\ndefaults: 3\n", 2, "defaults: must be a mapping"),
    ],
)
def test_each_bad_input_names_its_line(tmp_path, text, line, expected):
    problems = errors(tmp_path, text)
    assert any(p.startswith(f"{tmp_path / 'job.yaml'}:{line}:") and expected in p for p in problems), problems


def test_init_image_with_another_aspect_is_refused_before_rendering(tmp_path):
    Image.new("RGB", (64, 32), "red").save(tmp_path / "wide.png")
    problems = errors(tmp_path, "prompt: p\ninit_image: wide.png\nsize: 32\n")
    assert "wide.png is 64x32" in problems[0] and "job.yaml:2: init_image:" in problems[0]


def test_empty_and_missing_job_files(tmp_path):
    with pytest.raises(JobError, match="empty"):
        job(tmp_path, "")
    with pytest.raises(JobError, match="not found"):
        load_job(tmp_path / "nope.yaml")


def test_too_many_images_is_refused(tmp_path):
    with pytest.raises(JobError, match="at most 1,000,000"):
        job(tmp_path, "prompt: p\nseed: 1-100000\ncfg: 1-20\n")


def test_aliases_from_a1111(tmp_path):
    [t] = tasks_of(job(tmp_path, "prompt: p\nsampler: Euler a\n"))
    assert t.sampler == "euler_a"
    [t] = tasks_of(job(tmp_path, "prompt: p\nsampler: DPM++ 2M\nkarras: true\nseed: -1\n"))
    assert (t.sampler, t.karras) == ("dpmpp_2m", True)
    assert 0 <= t.seed < 2**32


# -- fuzzing: a valid plan or a JobError, never a traceback


NUMBER = st.one_of(st.integers(-5, 30), st.floats(-2, 20, allow_nan=False).map(lambda x: round(x, 2)))
RANGE_TEXT = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", NUMBER, NUMBER),
    st.builds(lambda a, b, s: f"{a}-{b} ({s:+})", NUMBER, NUMBER, NUMBER),
    st.builds(lambda a, b, n: f"{a}-{b} [{n}]", NUMBER, NUMBER, st.integers(0, 12)),
    st.text(alphabet="0123456789.-+()[], e", max_size=16),
)


@given(RANGE_TEXT, st.booleans())
def test_range_parser_fuzz(text, integer):
    try:
        values = parse_range(text, integer)
    except RangeError:
        return
    assert values and all(isinstance(v, int if integer else float) and math.isfinite(v) for v in values)


SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    NUMBER,
    st.text(max_size=12),
    RANGE_TEXT,
    st.sampled_from(["euler", "ddim", "random", "random [2]", "512", "32x32", "auto"]),
)
VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
KEYS = st.sampled_from(
    [
        "prompt",
        "negative",
        "seed",
        "steps",
        "cfg",
        "strength",
        "size",
        "sampler",
        "karras",
        "batch_size",
        "mask",
        "init_image",
        "defaults",
        "runs",
        "name",
        "model",
        "sheet",
        "filename",
        "bogus",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(KEYS, VALUE, max_size=6))
def test_random_yaml_gives_a_plan_or_a_job_error(tmp_path, data):
    import yaml

    text = yaml.safe_dump(data)
    try:
        j = parse_job(text, tmp_path / "fuzz.yaml")
    except JobError as e:
        assert e.problems and all(p.message for p in e.problems)
        return
    tasks = tasks_of(j)
    assert len(tasks) >= 1
    assert all(t.steps >= 1 and 0 <= t.seed < 2**64 and t.width % 8 == 0 for t in tasks)
