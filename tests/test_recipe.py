"""The recipe is the one home of what decides an image: every field travels through YAML, the task,
its id, both PNG chunks, the manifest, `rerun`, file-name tokens and sheet axes. This test walks
`Recipe`'s fields, so a new field forgotten in any of those places fails here."""

import json
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdbatch.jobs import AXES, load_job
from sdbatch.jobs.fields import PARSERS
from sdbatch.output.names import TOKENS, file_name
from sdbatch.output.png import read_png_text
from sdbatch.output.sheets import SHEET_AXES
from sdbatch.plan import ModelInfo, expand_tasks, plan_job
from sdbatch.recipe import A1111_KEYS, DEFAULTS, DOCS, Recipe, RecipeError, a1111_values
from sdbatch.rerun import recipe_from_image
from sdbatch.runner import Options, Reporter, run_job

# For each field: the YAML that sets it to something other than its default (with what the value
# needs to be valid), and the value the recipe must then hold. A new field without an entry fails.
IMAGE, MASK = "init.png", "mask.png"
REPO = Path(__file__).resolve().parent.parent
CASES = {
    "prompt": ({"prompt": "a red circle, (detail)"}, "a red circle, (detail)"),
    "negative": ({"negative": "blurry, dark"}, "blurry, dark"),
    "emphasis": ({"emphasis": "No norm"}, "no-norm"),  # A1111's own name accepted
    "clip_skip": ({"clip_skip": 2}, 2),
    "lora": ({"lora": {"demo-warp": 0.5}, "lora_folder": str(REPO / "jobs" / "loras")}, (("demo-warp", 0.5, 0.5),)),
    "init_image": ({"init_image": IMAGE, "strength": 0.5}, IMAGE),
    "mask": ({"init_image": IMAGE, "mask": MASK, "strength": 0.5}, MASK),
    "size": ({"size": [40, 24]}, (40, 24)),
    "resize": ({"init_image": IMAGE, "strength": 0.5, "resize": "Crop and resize"}, "crop"),  # A1111's name
    "sampler": ({"sampler": "DPM++ 2M"}, "dpmpp_2m"),
    "karras": ({"sampler": "euler", "karras": True}, True),
    "steps": ({"steps": 7}, 7),
    "schedule": ({"schedule": "SGM Uniform"}, "sgm_uniform"),  # A1111's label accepted
    "compat": ({"compat": "a1111"}, "a1111"),
    "strength": ({"init_image": IMAGE, "strength": 0.4}, 0.4),
    "cfg": ({"cfg": 3.5}, 3.5),
    "hires_scale": ({"hires_scale": 2}, 2.0),  # the hires: block is tests/test_hires.py's
    "hires_size": ({"hires_size": "64x0"}, (64, 0)),  # a side 0 keeps the aspect, as A1111 writes it
    "hires_upscaler": ({"hires_scale": 2, "hires_upscaler": "Latent (bicubic)"}, "latent-bicubic"),
    "hires_steps": ({"hires_scale": 2, "hires_steps": 3}, 3),
    "hires_sampler": ({"hires_scale": 2, "hires_sampler": "DPM++ 2M"}, "dpmpp_2m"),
    "hires_schedule": ({"hires_scale": 2, "hires_schedule": "SGM Uniform"}, "sgm_uniform"),
    "hires_prompt": ({"hires_scale": 2, "hires_prompt": "a blue square, sharp"}, "a blue square, sharp"),
    "hires_negative": ({"hires_scale": 2, "hires_negative": "blurry"}, "blurry"),
    "hires_cfg": ({"hires_scale": 2, "hires_cfg": 5}, 5.0),
    "rng": ({"rng": "NV"}, "a1111"),  # A1111's name accepted
    "ensd": ({"rng": "a1111", "ensd": 31337}, 31337),
    "seed_resize_from": ({"rng": "a1111", "seed_resize_from": [48, 32]}, (48, 32)),
    "subseed_strength": ({"rng": "a1111", "subseed": 7, "subseed_strength": 0.25}, 0.25),
    "subseed": ({"rng": "a1111", "subseed": 7, "subseed_strength": 0.25}, 7),
    "downcast_alphas": ({"compat": "a1111", "downcast_alphas": True}, True),
    "seed": ({"seed": "12345678901234567"}, 12345678901234567),  # as text: must stay exact
}
FIELDS = [f.name for f in fields(Recipe)]


def test_every_field_has_a_default_a_doc_a_rule_a_parser_and_a_case():
    for name in FIELDS:
        assert name in DEFAULTS and DOCS[name], f"{name}: give it a default and a doc (recipe.param)"
        assert name in PARSERS, f"{name}: add its YAML parser to sdbatch.jobs.fields.PARSERS"
        assert name in CASES, f"{name}: add a non-default value to CASES in this test"
        assert name in AXES and name in SHEET_AXES and name in TOKENS, f"{name}: must be an axis and a name token"


def _folder(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 24), "red").save(tmp_path / IMAGE)
    Image.new("L", (40, 24), 255).save(tmp_path / MASK)
    return tmp_path


def _job(tmp_path: Path, values: dict) -> Path:
    body = {"name": "roundtrip", "output": "out", "filename": "{index}", "prompt": "p", "steps": 4} | values
    if "init_image" in values and "size" not in values:
        body["size"] = [40, 24]  # the images' shape
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _expected(name: str, value, tmp_path: Path):
    return str((tmp_path / value).resolve()) if name in ("init_image", "mask") else value


@pytest.mark.parametrize("name", FIELDS)
def test_each_field_round_trips_yaml_task_png_manifest_and_rerun(tmp_path, name):
    values, wanted = CASES[name]
    wanted = _expected(name, wanted, _folder(tmp_path))
    job = load_job(_job(tmp_path, values))
    model = ModelInfo.of(job.model)
    [task] = expand_tasks(job, model, {})
    recipe = task.recipe
    assert getattr(recipe, name) == wanted != DEFAULTS[name], "YAML -> task"

    # the id changes with the field
    [plain] = expand_tasks(load_job(_job(tmp_path, {k: v for k, v in values.items() if k != name} or {})), model, {})
    if name not in ("init_image", "strength"):  # these two are not separable from each other
        assert plain.id != task.id, "the task id must depend on the field"

    # the file-name token exists and formats
    assert file_name("{" + name + "}", task)

    # render (with a stand-in for the model), then read everything back
    summary = run_job(
        job, Options(), Reporter(), render=lambda batch: [(Image.new("RGB", t.size), None) for t in batch]
    )
    assert summary.exit_code == 0
    [entry] = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert Recipe.from_record(entry) == recipe, "manifest"
    png = tmp_path / "out" / entry["file"]
    chunks = read_png_text(png)
    assert Recipe.from_record(json.loads(chunks["sdbatch"])["task"]) == recipe, "sdbatch PNG chunk"
    assert recipe_from_image(png)[0] == recipe, "rerun"
    if name in A1111_KEYS or name in ("prompt", "negative"):
        assert a1111_values(chunks["parameters"])[name] == wanted, "A1111 parameters chunk"
    assert entry["id"] == task.id and plan_job(job, tmp_path / "out").done.keys() == {task.id}


def test_rerun_applies_the_job_file_limits_to_a1111_text():
    text = "a cat\nSteps: 5000, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    with pytest.raises(RecipeError, match="steps: 5000 is out of range"):
        Recipe.from_a1111(text)


def test_a1111_fields_sdbatch_cannot_reproduce_are_refused_by_name():
    text = (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Clip skip: 2, "
        'Lora hashes: "add_detail: 0123456789ab", ADetailer model: face_yolov8n.pt, ControlNet 0: "x"'
    )
    with pytest.raises(RecipeError, match="cannot reproduce these A1111 fields yet: ADetailer model, ControlNet 0"):
        Recipe.from_a1111(text)


def test_a_seed_in_a1111_text_is_read_exactly():
    text = "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 12345678901234567, Size: 512x768"
    r = Recipe.from_a1111(text)
    assert (r.seed, r.sampler, r.karras, r.size) == (12345678901234567, "dpmpp_2m", True, (512, 768))


def test_ids_of_0_1_0_are_kept():
    """Fields at their default beyond the first release's leave ids alone; the first release's
    fields are always part of the id, so output folders rendered before the recipe resume."""
    r = Recipe("p", size=(32, 32))
    data = {
        "prompt": "p",
        "negative": "",
        "seed": 0,
        "steps": 30,
        "sampler": "euler_a",
        "karras": False,
        "cfg": 7.5,
        "strength": None,
        "width": 32,
        "height": 32,
        "init_image": None,
        "mask": None,
        "model": "m",
    }
    import hashlib

    assert r.task_id("m", str) == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


ORCHESTRATION = (
    "sdbatch.jobs",
    "sdbatch.recipe",
    "sdbatch.plan",
    "sdbatch.output.names",
    "sdbatch.output.manifest",
    "sdbatch.output.sheets",
    "sdbatch.runner",
    "sdbatch.render",
)


def test_validate_and_plan_import_neither_torch_nor_transformers(tmp_path):
    """Cron users validate jobs often: validating and planning read the model's header only."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "init.png")
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent("prompt: p\ninit_image: init.png\nstrength: 0.5\nseed: 1-3\n"))
    code = textwrap.dedent(
        f"""
        import importlib, json, sys
        from sdbatch.cli import app
        for module in {ORCHESTRATION!r}:
            importlib.import_module(module)
        codes = []
        for args in (["validate", {str(job)!r}], ["plan", {str(job)!r}, "-o", {str(tmp_path / "out")!r}]):
            try:
                app(args)
            except SystemExit as e:
                codes.append(e.code)
        heavy = [m for m in ("torch", "transformers", "safetensors", "diffusers") if m in sys.modules]
        print(json.dumps({{"codes": codes, "heavy": heavy}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0], "heavy": []}, done.stderr


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
def test_a1111_schedule_type_is_ignored_for_its_timestep_samplers_as_a1111_ignores_it(sampler):
    """A1111 1.9+ writes `Schedule type` for every sampler, but DDIM, PLMS and UniPC walk its fixed
    timestep grid whatever it says; a k-diffusion sampler's schedule type is kept."""
    text = f"a cat\nSteps: 20, Sampler: {sampler}, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512"
    r = Recipe.from_a1111(text)
    assert (r.sampler, r.karras, r.schedule) == (sampler.lower(), False, "automatic")
    assert Recipe.from_a1111(text.replace(sampler, "Euler")).karras


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from([f.name for f in fields(Recipe)]),
    value=JSON_VALUES,
    hires=st.booleans(),
)
def test_any_json_value_in_any_field_is_a_recipe_error_never_a_crash(field, value, hires):
    """A record from a file (an image's sdbatch chunk, a manifest line) may hold any JSON value in
    any field: a list for a sampler once raised TypeError (unhashable) and a NaN strength a
    ValueError in the rules across fields, as tracebacks from inspect and rerun."""
    record = Recipe(prompt="a", size=(64, 64), **({"hires_scale": 2.0, "strength": 0.5} if hires else {})).to_record()
    record[field] = value
    try:
        Recipe.from_record(record)
    except RecipeError as e:
        assert str(e) and "\n" not in str(e)  # one line, said as the CLI says it
