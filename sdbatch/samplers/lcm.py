"""Latent Consistency Model sampling (Luo et al. 2023), as diffusers' `LCMScheduler`: each step
jumps to a clean estimate through the consistency function, then noises it afresh to the next
timestep. Made for LCM-distilled weights (an LCM-LoRA): 4-8 steps at CFG 1-2; on an ordinary
model it gives blurred pictures.

Our conventions, translated. diffusers works on the VP latent x_vp = x / sqrt(1 + sigma^2); the
denoised estimate model(x, i) = x - sigma * eps is exactly its predicted x0. So a step is
    denoised = c_out * model(x, i) + c_skip * x_vp
    x_next = denoised + sigma_next * noise  (diffusers' sqrt(abar') denoised + sqrt(1 - abar') noise, in VE)
and after the last step (sigma 0) no noise is drawn, as in diffusers: n steps draw n - 1 noises,
each after its step's model call. The boundary scalings are functions of the integer timestep t:
c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25) (sigma_data 0.5, timestep
scaling 10). `sample` sees only sigmas, so it reads each t back from its sigma on the SD schedule;
this is exact, the plan's sigmas being the schedule's own values at integer timesteps.

Timesteps: the 50-step distillation grid 999, 979, ..., 19 (diffusers' original_inference_steps=50,
skipping step 20), `steps` of them at indices floor(linspace(0, 50, steps, endpoint=False)): 999,
759, 499, 259 for 4 steps. diffusers' `timestep_spacing` and `steps_offset` do not enter
LCMScheduler's schedule, so `LCMScheduler.from_config(sd15_scheduler.config)` gives the same.
At most 50 steps (diffusers refuses more). Karras sigmas do not apply: the consistency function
is trained on this grid only.

img2img runs the last int(steps * strength) steps of this plan from the image noised to the first
of them, which is what diffusers' StableDiffusionImg2ImgPipeline (AutoPipelineForImage2Image, as in
its LCM-LoRA guide) does with LCMScheduler; diffusers' LatentConsistencyModelImg2ImgPipeline
instead passes `strength` to `set_timesteps` and runs all `steps` on the first int(50 * strength)
grid points; we do not follow that one.

A1111's "LCM" (modules/sd_samplers_lcm.py) differs; ours follows diffusers:
- its default schedule is linspace(999, 19, steps) in t with log-sigma-interpolated sigmas, and the
  UNet (and c_skip/c_out) is told the nearest grid timestep: 999, 679, 339, 19 for 4 steps (ours:
  999, 759, 499, 259), 999, 859, ..., 159, 19 for 8 (ours: 999, 879, ..., 139); the UNet input is
  scaled by the interpolated sigma, not the grid timestep's. Its scheduler menu (Karras, ...) can
  also pick other sigmas, snapped the same way.
- c_skip multiplies the VE latent x instead of x_vp (negligible: c_skip <= 7e-6 on the grid).
- img2img follows A1111's own rule for all samplers, not int(steps * strength).
So an A1111 LCM image is not reproduced by `lcm`, even with a1111 noise.
"""

import numpy as np
import torch

from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan

# the timestep grid LCM weights were distilled on (diffusers' original_inference_steps; SAMPLERS["lcm"].max_steps)
ORIGINAL_STEPS = 50
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def plan(schedule: NoiseSchedule, steps: int) -> StepPlan:
    if steps > ORIGINAL_STEPS:
        raise ValueError(f"lcm takes at most {ORIGINAL_STEPS} steps (its distillation grid), got {steps}")
    k = schedule.train_steps // ORIGINAL_STEPS
    grid = (np.arange(1, ORIGINAL_STEPS + 1) * k - 1)[::-1]  # 999, 979, ..., 19
    t = grid[np.floor(np.linspace(0, ORIGINAL_STEPS, steps, endpoint=False)).astype(np.int64)]
    return StepPlan.of(t, schedule.sigmas[t], 0.0, vp_init=True)


def boundary_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency function at timestep t: c_skip -> 1 as t -> 0."""
    scaled = t * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def sample(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource, after_step: AfterStep = None
) -> torch.Tensor:
    timesteps = NoiseSchedule().t_at(sigmas[:-1].cpu().numpy()).round()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        c_skip, c_out = boundary_scalings(float(timesteps[i]))
        x = c_out * model(x, i) + c_skip * (x / (s**2 + 1).sqrt())
        if s_next > 0:  # no noise after the last step
            x = x + s_next * noise()
        if after_step:
            x = after_step(i, x)
    return x
