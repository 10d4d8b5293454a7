"""The plans of A1111's "timestep" samplers DDIM, PLMS and UniPC (`compat: a1111`), as A1111 1.6-1.10
runs them (`modules/sd_samplers_timesteps.py`, `sd_samplers_timesteps_impl.py`): outside k-diffusion,
in VP space, on the checkpoint's own `alphas_cumprod` (`NoiseSchedule.compvis()`), on the grid

    grid = clip(arange(0, 1000, 1000 // steps) + 1, 0, 999)

1, 21, ..., 981 for 50 steps; 1, 77, ..., 989 (14 points) for 13 steps: more than `steps` points when
1000 is not a multiple of 1000 // steps. Our samplers work in VE space (schedule.py); each of A1111's
loops is one of them on sigma = sqrt((1 - a) / a):

- DDIM (eta 0): `for index in len(grid) - 1 ... 1`: one model call per step from the top point down
  to grid[0] = t 1, not 0, so len(grid) - 1 calls (49 for 50 steps), and the VAE decodes that latent
  as it is. A DDIM step in VP space is an Euler step in VE space: `ddim.sample` on the grid's sigmas,
  the plan ending at sigma(1) > 0 (`StepPlan.to_vp` maps the last latent back).
- PLMS: the same steps with Adams-Bashforth on up to 4 eps; the first step is made twice ("pseudo
  improved Euler": a second call at the step's end, then the mean of both eps), so len(grid) calls.
  The plan lists the model calls, the first step's end twice (as diffusers' PNDM lists its timesteps);
  `plms.sample` handles both.
- UniPC (A1111's port, `modules/models/diffusion/uni_pc`, with its option defaults: variant bh1, skip
  type time_uniform, order 3, lower order final; multistep, data prediction): its own time t from 1
  to 1/1000 in len(grid) uniform steps, the UNet told the fractional timestep (t - 1/1000) * 1000 and
  log alpha interpolated linearly in t; no model call after the last step: len(grid) calls, ending
  at t = 1/1000 (the sigma of timestep 0, above 0). A1111 refuses fewer steps than its order 3; we
  lower the order instead (`unipc.sample`).
- txt2img starts from pure noise of std 1 in VP space (`vp_init`).
- img2img (`sample_img2img`): steps, t_enc = `setup_img2img_steps` (t_enc = int(min(strength, 0.999)
  * steps); hires and "img2img fix steps": int(fixed / strength) steps, t_enc = fixed - 1); the image
  is noised to grid[t_enc] and the sampler runs over grid[:t_enc] (DDIM: t_enc - 1 calls), so it
  starts one grid point below the noise it was given (`StepPlan.noise_sigma`); UniPC runs t_enc steps
  from t = grid[t_enc - 1] / 1000 + 1/1000. These runs are not tails of the txt2img plan: the plan is
  made for the run, and img2img starts at its step 0.

Prompt editing counts model calls, as A1111's CFGDenoiser does, over `steps`: PLMS's extra first
call is call 1, so A1111 switches prompts one step earlier than the step count says after the first
step; model(x, i) is told i = the call's number in all three plans, so the pipeline does the same.
"""

import numpy as np
import torch

from . import A1111_TIMESTEPS
from .schedule import NoiseSchedule, StepPlan, a1111_img2img

UNIPC_T0 = 1e-3  # A1111's UniPC ends at t = 1 / N (N = 1000 discrete steps)


def grid(steps: int, train_steps: int = 1000) -> np.ndarray:
    """A1111's `CompVisSampler.get_timesteps` (discard_next_to_last_sigma is off for these samplers)."""
    return np.clip(np.arange(0, train_steps, train_steps // steps) + 1, 0, train_steps - 1)


def a1111_plan(
    schedule: NoiseSchedule,
    sampler: str,
    steps: int,
    strength: float | None = None,
    fixed_steps: int | None = None,
) -> StepPlan:
    """The plan of A1111's `sampler` (ddim, plms or unipc): txt2img, or with `strength` the img2img run
    (`fixed_steps`: hires' second pass, see `schedule.a1111_img2img`), noised at `noise_sigma`."""
    if sampler not in A1111_TIMESTEPS:
        raise ValueError(f"{sampler} is not one of A1111's timestep samplers ({', '.join(sorted(A1111_TIMESTEPS))})")
    if strength is None:
        points = grid(steps, schedule.train_steps)
        run, noise_at = points, None
    else:
        total, start = a1111_img2img(steps, strength, fixed_steps)
        t_enc = total - start - 1
        if t_enc < 1:
            raise ValueError(f"strength {strength:g} of {total} steps: A1111 runs no step at all")
        points = grid(total, schedule.train_steps)
        run, noise_at = points[:t_enc], int(points[t_enc])
    if sampler == "unipc":
        made = _unipc(schedule, len(run), None if noise_at is None else int(run[-1]))
    else:
        down = run[::-1]
        calls = down[:-1] if sampler == "ddim" or len(down) < 2 else np.concatenate([down[:2], down[1:-1]])
        made = StepPlan.of(calls, schedule.sigmas[calls], float(schedule.sigmas[down[-1]]), vp_init=True)
    if noise_at is None:
        return made
    return StepPlan(made.timesteps, made.sigmas, True, torch.tensor(float(schedule.sigmas[noise_at])))


def _unipc(schedule: NoiseSchedule, steps: int, top: int | None) -> StepPlan:
    """UniPC's time-uniform grid, as A1111 computes it in float32 torch: t from 1 (or from the img2img
    start top / 1000 + 1/1000) to 1/1000 over `steps` steps."""
    t_start = 1.0 if top is None else torch.tensor(top) / 1000 + 1 / 1000
    t = torch.linspace(t_start, UNIPC_T0, steps + 1)
    model_t = (t - 1.0 / schedule.train_steps) * 1000.0
    # NoiseScheduleVP('discrete'): log alpha = 0.5 log(alphas_cumprod), linear in t between t_k = (k + 1) / N
    t_array = torch.linspace(0.0, 1.0, schedule.train_steps + 1)[1:].double().numpy()
    log_alpha = (0.5 * torch.log(schedule.alphas_cumprod)).double().numpy()
    log_alpha_t = np.interp(t.double().numpy(), t_array, log_alpha)
    sigmas = np.sqrt(np.expm1(-2.0 * log_alpha_t))  # VE sigma = sqrt(1 - alpha^2) / alpha
    return StepPlan(model_t[:-1].float(), torch.from_numpy(sigmas).float(), vp_init=True)
