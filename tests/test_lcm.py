"""The lcm sampler against diffusers' LCMScheduler: step by step on the test denoiser of
test_samplers (which makes solver mistakes visible), and through the whole pipeline (txt2img,
img2img, inpainting)."""

import numpy as np
import pytest
import torch
from diffusers import (
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from helpers import BETAS, max_diff, request
from test_pipeline import PROMPTS, SEEDS, H, W, assert_close, gens, gradient_image, half_mask, ours, pixels, theirs
from test_samplers import SEEDS as ROWS
from test_samplers import draw, unet_and_context  # noqa: F401 (a fixture)

from sdbatch.samplers import NoiseSchedule, get_sampler, img2img_start
from sdbatch.samplers.lcm import boundary_scalings

LATENT = (4, 8, 8)


def diffusers_steps(steps, strength, unet, ctx, x0) -> list[torch.Tensor]:
    """diffusers' LCM loop as its SD pipelines run it: the VP latents after each step."""
    sched = LCMScheduler(**BETAS)
    sched.set_timesteps(steps)
    g = [torch.Generator().manual_seed(s) for s in ROWS]
    timesteps = sched.timesteps
    if x0 is None:
        latents = draw(g, LATENT) * sched.init_noise_sigma
    else:
        start = img2img_start(steps, strength)
        timesteps = timesteps[start:]
        sched.set_begin_index(start)
        latents = sched.add_noise(x0, draw(g, LATENT), timesteps[:1].repeat(len(ROWS)))
    out = []
    with torch.no_grad():
        for t in timesteps:
            eps = unet(sched.scale_model_input(latents, t), t.expand(len(ROWS)), ctx)
            latents = sched.step(eps, t, latents, generator=g).prev_sample
            out.append(latents)
    return out


def our_steps(steps, strength, unet, ctx, x0) -> list[torch.Tensor]:
    """Ours on the same model, per-image generators and start, the latents after each step made VP."""
    plan = get_sampler("lcm").plan(NoiseSchedule(), steps)
    g = [torch.Generator().manual_seed(s) for s in ROWS]
    if x0 is None:
        x = draw(g, LATENT) * plan.initial_noise_scale()
    else:
        plan = plan.from_step(img2img_start(steps, strength))
        x = x0 + draw(g, LATENT) * plan.sigmas[0]

    def model(x, i):
        sigma = plan.sigmas[i]
        return x - sigma * unet(x / (sigma**2 + 1).sqrt(), plan.timesteps[i].expand(len(ROWS)), ctx)

    out = []

    def record(i, x):
        out.append(x / (plan.sigmas[i + 1] ** 2 + 1).sqrt())
        return x

    with torch.no_grad():
        get_sampler("lcm").sample(model, x, plan.sigmas, lambda: draw(g, LATENT), record)
    return out


@pytest.mark.parametrize("steps", [4, 8, 6, 13])
@pytest.mark.parametrize("strength", [None, 0.5, 0.75], ids=["txt2img", "img2img0.5", "img2img0.75"])
def test_every_step_matches_diffusers(unet_and_context, steps, strength):  # noqa: F811
    unet, ctx = unet_and_context
    x0 = None if strength is None else torch.randn(len(ROWS), *LATENT, generator=torch.Generator().manual_seed(9))
    theirs_ = diffusers_steps(steps, strength, unet, ctx, x0)
    ours_ = our_steps(steps, strength, unet, ctx, x0)
    assert len(ours_) == len(theirs_) == (steps if x0 is None else int(steps * strength))
    for i, (a, b) in enumerate(zip(ours_, theirs_, strict=True)):
        assert max_diff(a, b) <= 1e-5, f"step {i}: {max_diff(a, b)}"


@pytest.mark.parametrize("steps", range(1, 51))
def test_timesteps_and_sigmas_are_diffusers(steps):
    sched = LCMScheduler(**BETAS)
    sched.set_timesteps(steps)
    plan = get_sampler("lcm").plan(NoiseSchedule(), steps)
    assert plan.timesteps.long().tolist() == sched.timesteps.tolist()
    abar = sched.alphas_cumprod[sched.timesteps]
    assert torch.equal(plan.sigmas[:-1], ((1 - abar) / abar).sqrt())
    assert plan.sigmas[-1] == 0


def test_four_steps_walk_the_distillation_grid():
    assert get_sampler("lcm").plan(NoiseSchedule(), 4).timesteps.tolist() == [999, 759, 499, 259]


def test_boundary_scalings_are_diffusers():
    sched = LCMScheduler(**BETAS)
    for t in (19, 259, 999):
        assert np.allclose(boundary_scalings(t), sched.get_scalings_for_boundary_condition_discrete(t), rtol=1e-6)


def test_noise_is_drawn_after_every_step_but_the_last():
    plan = get_sampler("lcm").plan(NoiseSchedule(), 4)
    events = []

    def model(x, i):
        events.append(f"model {i}")
        return torch.zeros_like(x)

    def noise():
        events.append("noise")
        return torch.ones(1)

    x = get_sampler("lcm").sample(model, torch.ones(1), plan.sigmas, noise)
    assert events == ["model 0", "noise", "model 1", "noise", "model 2", "noise", "model 3"]
    assert float(x.abs().max()) < 1e-5  # the last step returns the (here zero) clean estimate, unnoised


def test_karras_and_more_than_fifty_steps_are_refused():
    with pytest.raises(ValueError, match="sampler lcm walks fixed timesteps"):
        get_sampler("lcm").plan(NoiseSchedule(), 4, karras=True)
    with pytest.raises(ValueError, match="lcm takes at most 50 steps"):
        get_sampler("lcm").plan(NoiseSchedule(), 51)


def test_a1111_name_is_lcm():
    from sdbatch.samplers import SAMPLER_NAMES, SAMPLERS

    assert SAMPLERS["lcm"].a1111 == "LCM"
    assert SAMPLER_NAMES["lcm"] == SAMPLER_NAMES["k_lcm"] == "lcm"


# ----------------------------------------------------------------------------------------------------
# the whole pipeline, against diffusers' SD pipelines (txt2img, img2img, inpaint) with LCMScheduler


@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_txt2img_matches_diffusers(cfg):
    pipe = ours()
    requests = [
        request(p, seed=s, steps=4, sampler="lcm", cfg=cfg, width=W, height=H)
        for p, s in zip(PROMPTS, SEEDS, strict=True)
    ]
    mine = pixels([r.image for r in pipe.render(requests)])
    ref = theirs(StableDiffusionPipeline, pipe, "lcm")(
        prompt=PROMPTS, num_inference_steps=4, guidance_scale=cfg, generator=gens(), height=H, width=W, output_type="np"
    ).images
    assert_close(mine, ref * 255)


def test_img2img_matches_diffusers():
    pipe = ours()
    inits = [gradient_image(s) for s in SEEDS]
    requests = [
        request(p, seed=s, steps=8, sampler="lcm", cfg=2.0, width=W, height=H, init_image=i, strength=0.5)
        for p, s, i in zip(PROMPTS, SEEDS, inits, strict=True)
    ]
    mine = pixels([r.image for r in pipe.render(requests)])
    ref = theirs(StableDiffusionImg2ImgPipeline, pipe, "lcm")(
        prompt=PROMPTS,
        image=inits,
        strength=0.5,
        num_inference_steps=8,
        guidance_scale=2.0,
        generator=gens(),
        output_type="np",
    ).images
    assert_close(mine, ref * 255)


@pytest.mark.parametrize(("config", "strength"), [("tiny", 0.5), ("tiny-inpainting", 1.0)])
def test_inpaint_matches_diffusers(config, strength):
    pipe = ours(config)
    inits = [gradient_image(s) for s in SEEDS]
    masks = [half_mask(left=bool(k % 2)) for k in range(len(SEEDS))]
    requests = [
        request(p, seed=s, steps=8, sampler="lcm", cfg=1.5, width=W, height=H, init_image=i, mask=m, strength=strength)
        for p, s, i, m in zip(PROMPTS, SEEDS, inits, masks, strict=True)
    ]
    mine = pixels([r.image for r in pipe.render(requests)])
    ref = theirs(StableDiffusionInpaintPipeline, pipe, "lcm")(
        prompt=PROMPTS,
        image=inits,
        mask_image=masks,
        strength=strength,
        num_inference_steps=8,
        guidance_scale=1.5,
        generator=gens(),
        height=H,
        width=W,
        output_type="np",
    ).images
    assert_close(mine, ref * 255)


def test_a_job_with_more_lcm_steps_than_its_grid_is_refused_at_validate_time(tmp_path):
    from sdbatch.jobs import JobError, load_job

    job = tmp_path / "job.yaml"
    job.write_text("prompt: a red circle\nsampler: LCM\nsteps: [8, 60]\n")
    with pytest.raises(JobError, match=r"job.yaml:3: steps: lcm takes at most 50 steps"):
        load_job(job).check(32, 1.0)
