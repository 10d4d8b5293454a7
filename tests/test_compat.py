"""`compat: a1111` and `schedule:`: the step plan A1111 makes (its sigmas of the checkpoints' noise
schedule, its automatic schedule per sampler, its img2img step rule), against the schedule functions
that test_kdiffusion.py holds to k-diffusion; `compat: diffusers` keeps diffusers' plans exactly."""

import numpy as np
import pytest
import torch

from sdbatch.jobs import JobError, load_job
from sdbatch.pipeline import Pipeline, Request
from sdbatch.recipe import Recipe
from sdbatch.samplers import SAMPLERS, NoiseSchedule, sigmas

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_file("demo")


def walked(pipe: Pipeline, monkeypatch, recipe: Recipe) -> tuple[torch.Tensor, int]:
    """The sigmas the sampler was given, and how many times the UNet ran."""
    seen: dict = {"calls": 0}
    sampler = SAMPLERS[recipe.sampler]
    module = sampler.module
    real_sample = module.sample

    def sample(model, x, sig, *rest):
        seen["sigmas"] = sig.clone()

        def counting(*args, **kwargs):
            seen["calls"] += 1
            return model(*args, **kwargs)

        return real_sample(counting, x, sig, *rest)

    monkeypatch.setattr(module, "sample", sample)
    [result] = pipe.render([Request(recipe)])
    assert result.ok
    return seen["sigmas"], seen["calls"]


def recipe(**values) -> Recipe:
    return Recipe(**({"prompt": PROMPT, "size": (32, 32), "steps": 9, "seed": 2} | values))


def test_compat_diffusers_keeps_diffusers_plans_and_a1111_takes_a1111s(pipe, monkeypatch):
    ours, _ = walked(pipe, monkeypatch, recipe(sampler="dpmpp_2m"))
    assert torch.equal(ours, SAMPLERS["dpmpp_2m"].plan(NoiseSchedule(), 9).sigmas)
    a1111, _ = walked(pipe, monkeypatch, recipe(sampler="dpmpp_2m", compat="a1111"))
    # A1111's "Automatic" for DPM++ 2M is Karras, over the checkpoints' own (float64 LDM) schedule
    assert torch.allclose(a1111, sigmas.karras(NoiseSchedule.compvis(), 9).float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, a1111)


@pytest.mark.parametrize("kind", ["exponential", "sgm_uniform", "polyexponential", "uniform"])
def test_a_schedule_type_gives_its_sigmas(pipe, monkeypatch, kind):
    got, _ = walked(pipe, monkeypatch, recipe(sampler="euler", schedule=kind))
    assert torch.allclose(got, sigmas.SCHEDULES[kind](NoiseSchedule.compvis(), 9).float(), rtol=1e-6, atol=0)


def test_img2img_under_a1111_runs_t_enc_plus_one_steps(pipe, monkeypatch):
    from PIL import Image

    image = Image.new("RGB", (32, 32), "red")
    for compat, expected in (("diffusers", int(20 * 0.75)), ("a1111", int(0.75 * 20) + 1)):
        r = recipe(sampler="euler", steps=20, init_image="x.png", strength=0.75, compat=compat)
        seen = {"calls": 0}
        module = SAMPLERS["euler"].module
        real = module.sample

        def sample(model, x, sig, *rest, seen=seen, real=real):
            def counting(*args, **kwargs):
                seen["calls"] += 1
                return model(*args, **kwargs)

            return real(counting, x, sig, *rest)

        monkeypatch.setattr(module, "sample", sample)
        assert pipe.render([Request(r, init_image=image)])[0].ok
        assert seen["calls"] == expected, compat


def test_compat_a1111_in_a_job_brings_a1111_noise_unless_rng_is_given(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"prompt: {PROMPT}\ncompat: a1111\nschedule: SGM Uniform\nsampler: DPM++ 2M\n")
    values = load_job(job).runs[0].values
    assert values["rng"] == ["a1111"] and values["schedule"] == ["sgm_uniform"]
    job.write_text(f"prompt: {PROMPT}\ncompat: a1111\nrng: diffusers\n")
    assert load_job(job).runs[0].values["rng"] == ["diffusers"]
    for body, message in (
        ("sampler: euler\nkarras: true\nschedule: exponential\n", "karras: true is schedule: karras"),
        ("sampler: ddpm\ncompat: a1111\n", "ddpm walks diffusers' fixed timesteps"),
        ("schedule: wobbly\n", "unknown schedule type 'wobbly'"),
    ):
        job.write_text(f"prompt: {PROMPT}\n{body}")
        with pytest.raises(JobError, match=message):
            load_job(job).check(32, 7.0)


def test_infotext_schedule_type_and_compat_round_trip():
    text = f"{PROMPT}\nSteps: 9, Sampler: DPM++ 2M, Schedule type: SGM Uniform, CFG scale: 7, Seed: 1, Size: 32x32"
    r = Recipe.from_a1111(text)
    assert (r.schedule, r.compat, r.rng) == ("sgm_uniform", "a1111", "a1111")
    again = Recipe.from_a1111(r.to_a1111({"Model": "demo"}, "0.1.0"))  # our own text, Version: sdbatch
    assert again == r
    karras = Recipe.from_a1111(text.replace("SGM Uniform", "Karras"))
    assert karras.karras and karras.schedule == "automatic"
    assert "Schedule type: Karras" in karras.to_a1111({}, "0.1.0")
    ours = recipe(sampler="euler")
    assert Recipe.from_a1111(ours.to_a1111({}, "0.1.0")) == ours  # compat diffusers, rng diffusers kept


def test_a1111_planned_images_differ_from_diffusers_planned_ones(pipe):
    a = np.asarray(pipe.render([Request(recipe(sampler="dpmpp_2m"))])[0].image).astype(int)
    b = np.asarray(pipe.render([Request(recipe(sampler="dpmpp_2m", compat="a1111"))])[0].image).astype(int)
    assert np.abs(a - b).mean() > 0.5


@pytest.mark.parametrize("sampler", ["heun", "dpm2", "dpmpp_2s_a"])
def test_second_order_samplers_switch_prompts_by_model_call_as_a1111_counts(pipe, monkeypatch, sampler):
    """A1111 builds the prompt schedule over 2 x steps for its second-order samplers and advances it
    at every model call (CFGDenoiser.step): `[a:b:3]` at 4 steps switches after the 4th call, not
    after the 4th step. With cfg 1 there is one UNet row per call."""
    seen: list[torch.Tensor] = []
    unet = pipe.unet
    monkeypatch.setattr(pipe, "unet", lambda x, t, context: seen.append(context) or unet(x, t, context))
    r = recipe(sampler=sampler, steps=4, cfg=1.0, prompt="[a red circle:a blue square:3]")
    assert pipe.render([Request(r)])[0].ok
    first, second = (pipe.encode_prompt(p) for p in ("a red circle", "a blue square"))
    names = ["first" if torch.equal(c, first) else "second" if torch.equal(c, second) else "?" for c in seen]
    # calls 0..3 are A1111's steps <= 3 of 8; every later call is the second prompt
    assert names[:4] == ["first"] * 4 and set(names[4:]) == {"second"}, names
