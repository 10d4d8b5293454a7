"""Where sampling starts, one function per start mode: the first latents, the step plan they run
(img2img runs its tail), the extra UNet input channels of a 9-channel inpainting model, and the step hook
that puts the known region back when a normal model inpaints.

Draw order matters for determinism: every draw comes from the images' own generators in diffusers'
order (VAE sample -> noise -> masked-image sample), so a seed gives diffusers' picture.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..samplers import AfterStep, StepPlan, img2img_start

Draw = Callable[[], torch.Tensor]  # one standard normal latent per image, each from its own generator
Encode = Callable[[torch.Tensor], torch.Tensor]  # images -> scaled latents sampled with one draw


@dataclass
class Start:
    x: torch.Tensor
    plan: StepPlan
    extra_channels: torch.Tensor | None = None  # concatenated to the UNet input (9-channel inpainting)
    after_step: AfterStep = None


def from_noise(plan: StepPlan, draw: Draw) -> Start:
    """txt2img: pure noise at the plan's first noise level."""
    return Start(draw() * plan.initial_noise_scale(), plan)


def from_image(
    plan: StepPlan, draw: Draw, latents: torch.Tensor, steps: int, strength: float, begin_at: int | None = None
) -> Start:
    """img2img: the encoded image noised to the step where the last int(steps * strength) begin."""
    noise = draw()
    plan = plan.from_step(_first(steps, strength, begin_at))
    return Start(plan.noised(latents, noise), plan)


def inpaint(
    plan: StepPlan,
    draw: Draw,
    encode: Encode,
    images,
    masks,
    steps: int,
    strength: float,
    posterior: Draw | None = None,
    begin_at: int | None = None,
) -> Start:
    """A normal (4-channel) model repaints the white of the mask: after each step the known region
    is put back at the new noise level (exact, without noise, after the last step). `posterior`
    draws the VAE samples (by default `draw`, diffusers' order)."""
    latents = encode(images)
    noise = draw()
    if strength == 1.0:
        x = noise * plan.initial_noise_scale()
    else:
        plan = plan.from_step(_first(steps, strength, begin_at))
        x = plan.noised(latents, noise)
    small = F.interpolate(masks, size=tuple(x.shape[-2:]))
    # diffusers encodes the masked image for 4-channel models too and never uses it; its sample
    # draw is made here as well so that every later draw (and image) lines up
    (posterior or draw)()
    last = len(plan) - 1

    def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
        sigma = plan.sigmas[i + 1]
        known = latents + noise * sigma if i < last else latents * (sigma**2 + 1).sqrt()
        return (1 - small) * known + small * x

    return Start(x, plan, None, after_step)


def inpaint_model(
    plan: StepPlan,
    draw: Draw,
    encode: Encode,
    images,
    masks,
    full: bool,
    steps: int,
    strength: float,
    begin_at: int | None = None,
) -> Start:
    """A 9-channel inpainting model is told the mask and the masked image's latents as extra
    channels. `full`: start from pure noise (txt2img, where everything is to be painted, or
    inpainting at strength 1); otherwise from the noised image, as img2img does."""
    latents = None if full else encode(images)
    noise = draw()
    if not full:
        plan = plan.from_step(_first(steps, strength, begin_at))
        x = plan.noised(latents, noise)
    else:
        x = noise * plan.initial_noise_scale()
    small = F.interpolate(masks, size=tuple(x.shape[-2:]))
    extra_channels = torch.cat([small, encode(images * (masks < 0.5))], dim=1)
    return Start(x, plan, extra_channels)


def _first(steps: int, strength: float, begin_at: int | None) -> int:
    """The plan step img2img starts at: `begin_at` when the sampler's convention gives one (A1111's
    rule for k-diffusion samplers, `samplers.schedule.a1111_img2img`; 0 for A1111's timestep samplers,
    whose plan is made for the img2img run, `samplers.timesteps`), else diffusers' rule."""
    return img2img_start(steps, strength) if begin_at is None else begin_at
