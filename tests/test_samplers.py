"""Our samplers against diffusers' schedulers: same UNet, same initial noise, same per-step noise."""

import numpy as np
import pytest
import torch
from conftest import make_tiny
from diffusers import DDPMScheduler
from helpers import BETAS, diffusers_scheduler, max_diff

from sdbatch.samplers import SAMPLERS, NoiseSchedule, get_sampler, img2img_start

SEEDS = (11, 12)


def draw(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """Per-image noise, one generator per image: what diffusers does when given a list of generators."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in gens])


@pytest.fixture(scope="module")
def unet_and_context():
    """A noise predictor that depends on x and t the way a trained one does, so that solver order,
    timesteps and sigmas all show in the result. A random UNet alone predicts nearly the same noise
    everywhere, and then every solver order gives the same answer: such a test could not fail."""
    unet = make_tiny().unet
    ctx = torch.randn(len(SEEDS), 77, 32, generator=torch.Generator().manual_seed(3))
    alphas = NoiseSchedule().alphas_cumprod.double().numpy()

    def predict(x, t, context):
        a = torch.from_numpy(np.interp(t.double().numpy(), np.arange(1000), alphas)).float()[:, None, None, None]
        exact = (1 - a).sqrt() * x / (0.25 * a + 1 - a)  # E[noise | x] for data ~ N(0, 0.25)
        return exact + 0.5 * unet(x, t, context)

    return predict, ctx


def run_diffusers(name, karras, steps, strength, unet, ctx, x0):
    sched = diffusers_scheduler(name, karras, steps)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    timesteps = sched.timesteps
    if x0 is None:
        latents = draw(gens, (4, 8, 8)) * sched.init_noise_sigma
    else:
        start = img2img_start(steps, strength)
        timesteps = timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        latents = sched.add_noise(x0, draw(gens, (4, 8, 8)), timesteps[:1].repeat(len(SEEDS)))
    with torch.no_grad():
        for t in timesteps:
            eps = unet(sched.scale_model_input(latents, t), t.expand(len(SEEDS)), ctx)
            latents = sched.step(eps, t, latents, generator=gens).prev_sample
    return latents


def run_ours(name, karras, steps, strength, unet, ctx, x0):
    sampler = get_sampler(name)
    plan = sampler.plan(NoiseSchedule(), steps, karras)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    if x0 is None:
        x = draw(gens, (4, 8, 8)) * plan.initial_noise_scale()
    else:
        plan = plan.from_step(img2img_start(steps, strength))
        x = x0 + draw(gens, (4, 8, 8)) * plan.sigmas[0]

    def model(x, i):
        sigma = plan.sigmas[i]
        eps = unet(x / (sigma**2 + 1).sqrt(), plan.timesteps[i].expand(len(SEEDS)), ctx)
        return x - sigma * eps

    with torch.no_grad():
        x = sampler.sample(model, x, plan.sigmas, lambda: draw(gens, (4, 8, 8)))
    return plan.to_vp(x)


# the samplers planned as diffusers plans (the k-diffusion ones are tested against k-diffusion in test_kdiffusion.py)
DIFFUSERS_PLANNED = [name for name, s in SAMPLERS.items() if not s.a1111_plan]
VARIANTS = [(name, False) for name in DIFFUSERS_PLANNED] + [
    (name, True) for name in DIFFUSERS_PLANNED if SAMPLERS[name].karras
]


@pytest.mark.parametrize(("name", "karras"), VARIANTS, ids=[f"{n}{'-karras' if k else ''}" for n, k in VARIANTS])
@pytest.mark.parametrize("steps", [6, 13])
@pytest.mark.parametrize("strength", [None, 0.3, 0.75], ids=["txt2img", "img2img0.3", "img2img0.75"])
def test_sampler_matches_diffusers(unet_and_context, name, karras, steps, strength):
    unet, ctx = unet_and_context
    x0 = None if strength is None else torch.randn(len(SEEDS), 4, 8, 8, generator=torch.Generator().manual_seed(9))
    theirs = run_diffusers(name, karras, steps, strength, unet, ctx, x0)
    ours = run_ours(name, karras, steps, strength, unet, ctx, x0)
    assert torch.isfinite(ours).all()
    assert max_diff(ours, theirs) <= 1e-4


def test_ddpm_timesteps_are_the_seeds():
    plan = get_sampler("ddpm").plan(NoiseSchedule(), 50)
    assert plan.timesteps.tolist() == list(range(980, -1, -20))
    assert plan.sigmas[-1] == 0


def test_ddim_timesteps_have_compvis_offset_and_end_above_zero():
    plan = get_sampler("ddim").plan(NoiseSchedule(), 50)
    assert plan.timesteps.tolist() == list(range(981, 0, -20))
    assert float(plan.sigmas[-1]) == pytest.approx(float(NoiseSchedule().sigmas[0]))  # set_alpha_to_one=False


@pytest.mark.parametrize(("steps", "strength", "start"), [(50, 0.8, 10), (50, 0.75, 13), (50, 1.0, 0), (20, 0.3, 14)])
def test_strength_gives_the_seeds_start_step(steps, strength, start):
    # the seed: start_step = num_inference_steps - int(num_inference_steps * strength)
    assert img2img_start(steps, strength) == start
    plan = get_sampler("ddpm").plan(NoiseSchedule(), steps).from_step(start)
    assert len(plan) == steps - start


def test_schedule_matches_diffusers_alphas():
    ours = NoiseSchedule().alphas_cumprod
    theirs = DDPMScheduler(**BETAS).alphas_cumprod
    assert torch.equal(ours, theirs)
    assert np.isclose(float(ours[-1]), 0.0047, atol=1e-4)


def test_karras_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="sampler ddim walks fixed timesteps; karras applies to euler, euler_a"):
        get_sampler("ddim").plan(NoiseSchedule(), 10, karras=True)
    with pytest.raises(ValueError, match="unknown sampler 'nonesuch'; known: ddpm, ddim, euler, euler_a, dpmpp_2m"):
        get_sampler("nonesuch")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        get_sampler("euler").plan(NoiseSchedule(), 0)
