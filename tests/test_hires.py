"""Hires fix (A1111's two passes) with the demo model: the second pass is img2img from the upscaled
first pass, by the job's compat's step rule, with fresh noise from the same seeds; jobs sweep it,
its infotext reads back as A1111 reads it, and bad hires blocks are refused at validate time.

The oracles: F.interpolate and PIL in the test for the upscaling, our public img2img for the second
pass's pixels, diffusers' own scheduler for diffusers' step rule, A1111's rule written out here
(`sigmas[steps - t_enc - 1:]` of a schedule of int(hires_steps / denoise)) for A1111's, and a port
of A1111's `parse_generation_parameters` for the infotext."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import diffusers_scheduler
from PIL import Image

from sdbatch.hires import auto_vae_tile, target
from sdbatch.jobs import Task
from sdbatch.jobs.job import load_job, parse_job
from sdbatch.pipeline import Pipeline, Request
from sdbatch.recipe import DEFAULTS, HIRES, Recipe
from sdbatch.runner import entry_for
from sdbatch.samplers import NoiseSchedule
from sdbatch.samplers.sigmas import automatic_plan


def load_job_text(text: str):
    return parse_job(text, Path("job.yaml"))


REPO = Path(__file__).resolve().parent.parent
TINY_UPSCALER = REPO / "jobs" / "upscalers" / "tiny-rrdb-x2.safetensors"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_file("demo")


def hires_recipe(**fields) -> Recipe:
    base = dict(prompt="a big red circle on a blue background", size=(32, 32), steps=6, cfg=5.0, seed=11)
    return Recipe(**(base | dict(hires_scale=2.0, strength=0.5, hires_steps=4) | fields))


def plain(recipe: Recipe) -> Recipe:
    """The recipe without hires fix: its first pass."""
    return replace(recipe, strength=None, **{name: DEFAULTS[name] for name in HIRES})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_within_one_level(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


# ----------------------------------------------------------------------------------------------------
# the two passes


@pytest.mark.parametrize(
    "fields",
    [
        dict(sampler="euler_a"),
        dict(sampler="dpmpp_2m", compat="a1111", rng="a1111"),
        dict(sampler="euler", hires_upscaler="latent-nearest-exact", hires_sampler="dpmpp_2m", hires_cfg=3.0),
    ],
    ids=["diffusers", "a1111", "overrides"],
)
def test_latent_hires_is_the_first_pass_interpolated_then_img2img_from_those_latents(pipe, fields):
    recipe = hires_recipe(**fields)
    hires = pipe.render([Request(recipe)])[0]
    first = pipe.render([Request(plain(recipe))])[0]
    mode = {"latent": "bilinear", "latent-nearest-exact": "nearest-exact"}[recipe.hires_upscaler]
    upscaled = F.interpolate(first.latents[None], size=(16, 16), mode=mode)
    second = recipe.second_pass()
    assert (second.size, second.steps, second.strength) == ((64, 64), 4, 0.5)
    latents = pipe._sample([Request(recipe)], [second], lambda own: upscaled)
    [again] = pipe._decode([Request(recipe)], latents)
    assert hires.image.size == (64, 64)
    assert_within_one_level(hires.image, again.image)


def test_pixel_hires_equals_img2img_of_the_upscaled_first_pass_image(pipe):
    """Under diffusers' conventions the second pass of a pixel upscaler is exactly img2img from the
    first pass's 8-bit image brought to size (here by PIL's Lanczos), with the same seed."""
    recipe = hires_recipe(hires_upscaler="lanczos")
    hires = pipe.render([Request(recipe)])[0]
    first = pipe.render([Request(plain(recipe))])[0]
    big = first.image.resize((64, 64), Image.Resampling.LANCZOS)
    img2img = replace(plain(recipe), init_image="<big>", size=(64, 64), steps=4, strength=0.5)
    again = pipe.render([Request(img2img, init_image=big)])[0]
    assert_within_one_level(hires.image, again.image)


@pytest.mark.parametrize("upscaler", ["lanczos", "nearest", "none", "tiny-rrdb-x2"])
@pytest.mark.parametrize(("side", "scale"), [(40, 1.3), (24, 1.5), (56, 1.1)])
def test_pixel_upscalers_render_any_scale_on_a_vae_of_another_factor(pipe, side, scale, upscaler):
    """int(side * scale) with a remainder of 4..7 past whole 8-pixel cells (52 for 40 x 1.3) was
    encoded whole by the demo's 4x VAE, 13 cells against the target's 12: every image failed at
    render although validate passed. SD's 8x VAE floors to whole cells by itself."""
    from sdbatch.addons.library import Folders, Library
    from sdbatch.plan import recipe_addons

    library = Library(Folders.of(upscalers=TINY_UPSCALER.parent))
    recipe = hires_recipe(size=(side, side), hires_scale=scale, hires_upscaler=upscaler, steps=2, hires_steps=2)
    result = pipe.render([Request(recipe, addons=recipe_addons(library, recipe))])[0]
    assert result.ok, result.error
    assert result.image.size == recipe.output_size == (int(side * scale) // 8 * 8,) * 2


def test_a_batch_of_hires_images_equals_each_rendered_alone(pipe):
    recipes = [hires_recipe(seed=s, prompt=p) for s, p in ((1, "a red circle"), (2, "a green square"))]
    together = pipe.render([Request(r) for r in recipes])
    for r, image in zip(recipes, together, strict=True):
        assert_within_one_level(image.image, pipe.render([Request(r)])[0].image)


class Calls:
    """The UNet, counting its calls: (latent height, timestep) of each."""

    def __init__(self, pipe: Pipeline):
        self.pipe, self.inner, self.seen = pipe, pipe.unet, []

    def __enter__(self) -> "Calls":
        def unet(x, t, context):
            self.seen.append((x.shape[-1], round(float(t[0]), 3)))
            return self.inner(x, t, context)

        self.pipe.unet = unet
        return self

    def __exit__(self, *exc) -> None:
        self.pipe.unet = self.inner

    def of(self, side: int) -> list[float]:
        return [t for s, t in self.seen if s == side]


def test_a1111_step_rule_runs_exactly_hires_steps_of_a_schedule_of_steps_over_denoise(pipe):
    recipe = hires_recipe(sampler="euler", compat="a1111", rng="a1111", steps=5, hires_steps=4, strength=0.5, cfg=1)
    with Calls(pipe) as calls:
        pipe.render([Request(recipe)])
    assert len(calls.of(8)) == 5  # the first pass: its steps, at 32 px (8 latent cells)
    # A1111: steps = int(4 / 0.5) = 8, t_enc = 4 - 1, sigmas[8 - t_enc - 1:] -> 4 steps
    schedule = NoiseSchedule.compvis()
    plan = automatic_plan(schedule, 8, "Euler")
    t_enc = 4 - 1
    assert calls.of(16) == pytest.approx([round(float(t), 3) for t in plan.timesteps[8 - t_enc - 1 :]], abs=2e-3)
    # Hires steps 0: the first pass's steps (5), of a schedule of int(5 / 0.5) = 10
    with Calls(pipe) as calls:
        pipe.render([Request(replace(recipe, hires_steps=0))])
    assert calls.of(16) == pytest.approx(
        [round(float(t), 3) for t in automatic_plan(schedule, 10, "Euler").timesteps[5:]], abs=2e-3
    )


def test_a1111_ddim_second_pass_walks_its_timestep_grid_by_the_hires_rule(pipe):
    """A1111's DDIM (sd_samplers_timesteps): grid = clip(range(0, 1000, 1000 // n) + 1, 0, 999); hires
    runs sample_img2img with steps = Hires steps: n = int(4 / 0.5), t_enc = 4 - 1, the loop over
    grid[:t_enc] calls the model at its points from the top down to the second."""
    recipe = hires_recipe(sampler="ddim", compat="a1111", rng="a1111", steps=6, hires_steps=4, strength=0.5, cfg=1)
    with Calls(pipe) as calls:
        pipe.render([Request(recipe)])
    n, t_enc = int(4 / 0.5), 4 - 1
    grid = [min(t + 1, 999) for t in range(0, 1000, 1000 // n)]
    assert calls.of(16) == [float(grid[i]) for i in range(t_enc - 1, 0, -1)]
    first_grid = [min(t + 1, 999) for t in range(0, 1000, 1000 // 6)]  # the first pass: txt2img, all of it
    assert calls.of(8) == [float(t) for t in first_grid[:0:-1]]


def test_diffusers_step_rule_runs_the_last_int_steps_times_denoise_of_diffusers_schedule(pipe):
    recipe = hires_recipe(sampler="euler_a", steps=5, hires_steps=6, strength=0.5, cfg=1)
    with Calls(pipe) as calls:
        pipe.render([Request(recipe)])
    assert len(calls.of(8)) == 5
    oracle = diffusers_scheduler("euler_a", False, 6).timesteps  # diffusers' img2img: the last int(6 * 0.5)
    assert calls.of(16) == pytest.approx([float(t) for t in oracle[6 - 3 :]], abs=1e-3)


def test_resize_of_another_aspect_crops_the_centre_as_a1111():
    assert target((512, 768), None, (1024, 1024)).upscale == (1024, 1536)
    assert target((512, 768), None, (1024, 1024)).crop == (0, 512)
    assert target((512, 768), None, (1024, 1024)).size == (1024, 1024)
    assert target((512, 512), 1.3, None).size == (664, 664)  # int(665) rounded down to whole latents
    assert target((768, 512), None, (0, 1024)).size == (1536, 1024)


def test_resize_to_another_aspect_renders_the_target_size(pipe):
    recipe = hires_recipe(hires_scale=None, hires_size=(48, 64), size=(32, 48), hires_upscaler="lanczos")
    assert pipe.render([Request(recipe)])[0].image.size == (48, 64)
    assert pipe.render([Request(replace(recipe, hires_upscaler="latent"))])[0].image.size == (48, 64)


# ----------------------------------------------------------------------------------------------------
# jobs, metadata, bad input


RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param_code


def a1111_parse(text: str) -> dict[str, str]:
    """A1111's `parse_generation_parameters`, reduced to the key-value line (its own regex)."""
    last = text.strip().split("\n")[-1]
    out = {}
    for key, value in RE_PARAM.findall(last):
        out[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return out


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdbatch", *args], capture_output=True, text=True, cwd=cwd)


def test_a_denoise_sweep_renders_six_images_a_sheet_and_a1111_infotext(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "prompt: a big red circle on a blue background\nsize: 32\nsteps: 5\nseed: [1, 2]\n"
        "hires:\n  scale: 2\n  denoise: [0.3, 0.5, 0.7]\n  steps: 4\n  upscaler: Latent (nearest)\n"
        "sheet: {x: strength, y: seed}\n"
    )
    done = run("run", str(job), "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 6 and all(Image.open(p).size == (64, 64) for p in pngs)
    assert (tmp_path / "out" / "sheets").is_dir() and list((tmp_path / "out" / "sheets").glob("*.png"))
    seen = set()
    for png in pngs:
        pairs = a1111_parse(Image.open(png).text["parameters"])
        assert pairs["Size"] == "32x32" and pairs["Hires upscale"] == "2" and pairs["Hires steps"] == "4"
        assert pairs["Hires upscaler"] == "Latent (nearest)"
        seen.add((pairs["Denoising strength"], pairs["Seed"]))
    assert seen == {(d, s) for d in ("0.3", "0.5", "0.7") for s in ("1", "2")}
    again = run("rerun", str(pngs[0]), "-o", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    rendered = Image.open(tmp_path / "again" / pngs[0].name).convert("RGB")
    assert_within_one_level(Image.open(pngs[0]).convert("RGB"), rendered)


@pytest.mark.parametrize(
    "hires, message",
    [
        ("{scale: 0}", "hires.scale: 0.0 is out of range"),
        ("{resize: 1000x1001}", "hires.resize: 1000x1001: each side must be a multiple of 8"),
        ("{resize: 0x64}", "hires.resize: got the number 100: YAML reads an unquoted 0x64 as hexadecimal"),
        ("{scale: 2, upscaler: no-such-upscaler}", "upscaler 'no-such-upscaler' not found"),
        ("{scale: 2, resize: 64x64}", "give hires a scale or a resize, not both"),
        ("{scale: 2, sampler: ddim, schedule: exponential}", "hires.schedule: second pass"),
        ("{scale: 2, sampler: lcm, steps: 60}", "hires.steps: second pass: lcm takes at most 50"),
        ("{denoise: 0.5}", "hires: give it a scale"),
        ("{scale: 2, bogus: 1}", "hires.bogus: unknown key"),
        ("[2, 3]", "hires: must be a mapping"),
    ],
)
def test_bad_hires_blocks_are_refused_at_validate_with_their_line(tmp_path, hires, message):
    job = tmp_path / "job.yaml"
    job.write_text(f"prompt: a circle\nsize: 32\nsampler: euler\nkarras: true\nhires: {hires}\n")
    done = run("validate", str(job), cwd=tmp_path)
    assert done.returncode == 2 and "job.yaml:5:" in done.stderr and message in done.stderr, done.stderr


def test_hires_with_an_init_image_is_refused(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
    job = tmp_path / "job.yaml"
    job.write_text("prompt: a circle\nsize: 32\ninit_image: in.png\nstrength: 0.5\nhires: {scale: 2}\n")
    done = run("validate", str(job), cwd=tmp_path)
    assert done.returncode == 2 and "hires fix renders txt2img only" in done.stderr, done.stderr


def test_an_upscaler_model_renders_and_its_file_enters_the_id(tmp_path):
    folder = tmp_path / "ups"
    folder.mkdir()
    (folder / "tiny.safetensors").write_bytes(TINY_UPSCALER.read_bytes())
    job = tmp_path / "job.yaml"
    job.write_text(
        "prompt: a circle\nsize: 32\nsteps: 4\nupscaler_folder: ups\nhires: {scale: 2, upscaler: tiny, steps: 3}\n"
    )
    done = run("run", str(job), "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [entry] = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert entry["addons"]["upscaler"]["sha256"] and entry["hires_upscaler"] == "tiny"
    [png] = (tmp_path / "out").glob("*.png")
    assert Image.open(png).size == (64, 64)
    assert a1111_parse(Image.open(png).text["parameters"])["Hires upscaler"] == "tiny"
    # another file of the same name: another image (its contents are in the id)
    data = bytearray(TINY_UPSCALER.read_bytes())
    data[-8:] = bytes(8)  # the last weights' bytes: still a valid file
    (folder / "tiny.safetensors").write_bytes(bytes(data))
    done = run("run", str(job), "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_the_vae_decodes_in_tiles_above_the_size_threshold_and_the_manifest_says_so():
    assert auto_vae_tile((1536, 1536)) is None and auto_vae_tile((2048, 2048)) == 1024
    assert auto_vae_tile((512, 2048)) == 1024
    big = Task(0, 0, "0" * 16, hires_recipe(size=(1024, 1024)))
    small = Task(0, 0, "0" * 16, hires_recipe())
    job = load_job_text("prompt: x\n")
    assert entry_for(big, "a.png", job, "ok")["vae_tile"] == 1024
    assert "vae_tile" not in entry_for(small, "a.png", job, "ok")


def test_tiled_decoding_applies_automatically(pipe, monkeypatch):
    import sdbatch.hires as hires

    seen = []
    import sdbatch.pipeline.pipeline as module

    real = module.tiled_decode

    def spy(decode, z, tile, overlap, factor):
        seen.append(tile)
        return real(decode, z, tile, overlap, factor)

    monkeypatch.setattr(module, "tiled_decode", spy)
    monkeypatch.setattr(hires, "VAE_TILE_ABOVE", 48)
    monkeypatch.setattr(hires, "VAE_TILE", 32)
    image = pipe.render([Request(hires_recipe())])[0].image
    assert image.size == (64, 64) and seen == [32 // pipe.latent_factor]
    assert torch.isfinite(torch.from_numpy(pixels(image))).all()


def test_hires_on_an_inpainting_model_paints_everything_in_the_second_pass():
    """A 9-channel model's second pass gets A1111's txt2img conditioning: a mask of ones and the
    encoded blank image, as its first pass (and txt2img on such a model) does."""
    from test_pipeline import ours

    pipe = ours("tiny-inpainting")
    recipe = hires_recipe(size=(16, 16), steps=3, hires_steps=2)
    [result] = pipe.render([Request(recipe)])
    assert result.ok and result.image.size == (32, 32)


def test_second_pass_prompt_editing_counts_on_from_the_first_pass_as_a1111(pipe):
    """A1111 1.6+: in the hires pass a fraction f switches at (f - 1) x hires steps and a step number
    n at n - first-pass steps: `[red:blue:0.5]` and `[red:blue:5]` (of 6 first-pass steps) are blue
    all through it (counted from its own start, as before A1111 1.6, both would begin red)."""
    seen: list[tuple[int, str]] = []
    real = pipe._context

    def context(recipe, text, embeddings=()):
        seen.append((recipe.size[0], text))
        return real(recipe, text, embeddings)

    pipe._context = context
    try:
        pipe.render([Request(hires_recipe(prompt="a [red:blue:0.5] circle", cfg=1))])
        second = {text for side, text in seen if side == 64}
        assert second == {"a blue circle"}
        seen.clear()
        pipe.render([Request(hires_recipe(prompt="a [red:blue:5] circle", cfg=1))])
        assert {text for side, text in seen if side == 32} == {"a red circle", "a blue circle"}  # the first pass
        assert {text for side, text in seen if side == 64} == {"a blue circle"}
    finally:
        del pipe._context


def test_a_runs_hires_block_replaces_the_defaults_and_none_turns_it_off(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "defaults:\n  size: 32\n  steps: 4\n  hires: {scale: 2, denoise: 0.3}\nruns:\n"
        "  - prompt: a\n    hires: none\n  - prompt: b\n  - prompt: c\n    hires: {resize: 64x64}\n"
        "  - prompt: d\n    hires: {scale: [none, 2], steps: 3, upscaler: lanczos}\n  - prompt: e\n"
        "    hires: {scale: 2, prompt: ''}\n"
    )
    got = [
        (r.prompt, r.hires_scale, r.hires_size, r.strength, r.hires_upscaler, r.hires_prompt)
        for _, r in load_job(job).expand({}, 32, 7.5)
    ]
    assert got == [
        ("a", None, None, None, "latent", None),  # hires: none: no hires fix, no denoise
        ("b", 2.0, None, 0.3, "latent", None),  # the defaults'
        ("c", None, (64, 64), 0.7, "latent", None),  # its own block, whole: A1111's default denoise
        ("d", None, None, None, "latent", None),  # scale none: a plain image, the hires settings dropped
        ("d", 2.0, None, 0.7, "lanczos", None),
        ("e", 2.0, None, 0.7, "latent", None),  # an empty hires prompt is the prompt, as in A1111
    ]


def test_a_fixed_timestep_hires_sampler_ignores_the_first_pass_schedule_as_a1111():
    recipe = hires_recipe(sampler="euler", karras=True, hires_sampler="ddim")
    assert not list(recipe.problems()) and recipe.second_pass().schedule == "automatic"
    text = (
        "a cat\nSteps: 20, Sampler: DDIM, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Denoising strength: 0.5, Hires upscale: 2, Hires sampler: Euler"
    )
    imported = Recipe.from_a1111(text)  # A1111's hires Euler takes the main Schedule type, unused by DDIM
    assert (imported.karras, imported.hires_sampler, imported.second_pass().schedule) == (False, "euler", "karras")
