"""Independent implementations (diffusers / transformers) of one of our configs, for parity tests."""

import os

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel

from sdbatch.models import SDConfig

# The device of the pipeline/parity tests: `SDBATCH_TEST_DEVICE=cuda pytest tests/test_pipeline.py
# tests/test_half_precision.py` runs them on a GPU (bench/gpu_check.py does, on a lent one); the CPU
# is the default, and CI's only device.
TEST_DEVICE = torch.device(os.environ.get("SDBATCH_TEST_DEVICE", "cpu"))
# the half type those tests render in: float16 where a GPU runs it, bfloat16 (fast) on the CPU
TEST_HALF = torch.float16 if TEST_DEVICE.type == "cuda" else torch.bfloat16

BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def diffusers_unet(cfg: SDConfig) -> UNet2DConditionModel:
    u = cfg.unet
    levels = len(u.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels))
    assert len(down) == levels
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(u.model_channels * m for m in u.channel_mult),
        layers_per_block=u.num_res_blocks,
        cross_attention_dim=u.context_dim,
        attention_head_dim=u.num_heads,  # diffusers' SD1 configs call the head count this
        norm_num_groups=u.norm_groups,
    )


def diffusers_vae(cfg: SDConfig) -> AutoencoderKL:
    v = cfg.vae
    n = len(v.ch_mult)
    return AutoencoderKL(
        in_channels=v.image_channels,
        out_channels=v.image_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v.ch * m for m in v.ch_mult),
        layers_per_block=v.num_res_blocks,
        latent_channels=v.z_channels,
        norm_num_groups=v.norm_groups,
        scaling_factor=v.scale_factor,
    )


def transformers_clip(cfg: SDConfig) -> CLIPTextModel:
    c = cfg.clip
    config = CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.width,
        intermediate_size=c.mlp,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        max_position_embeddings=c.max_positions,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def for_twin(twin: torch.nn.Module, state: dict) -> dict:
    """transformers 5 stores CLIPTextModel without the `text_model.` prefix that diffusers' converter and
    the published SD folders use, and strips it itself on load (its PrefixChange rule); do the same."""
    if not any(k.startswith("text_model.") for k in twin.state_dict()):
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def shake_norms(module: torch.nn.Module, seed: int) -> None:
    """Norm layers start as weight 1 / bias 0, which would hide a swapped or missing norm: randomise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class _Deterministic:
    """A deterministic scheduler whose `step` takes (and ignores) the `generator` the others take."""

    @staticmethod
    def of(cls):
        def step(self, *args, generator=None, **kwargs):
            return cls.step(self, *args, **kwargs)

        return type(cls.__name__, (cls,), {"step": step})


def diffusers_scheduler(name: str, karras: bool, steps: int | None = None):
    """The diffusers scheduler that our sampler `name` matches (set to `steps` if given)."""
    if name == "ddpm":
        sched = DDPMScheduler(**BETAS, clip_sample=False)
    elif name == "ddim":
        sched = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif name == "euler":
        sched = EulerDiscreteScheduler(**BETAS, use_karras_sigmas=karras)
    elif name == "euler_a":
        sched = EulerAncestralDiscreteScheduler(**BETAS)
    elif name == "lcm":
        sched = LCMScheduler(**BETAS)
    elif name == "plms":  # SD 1.x's own scheduler config
        sched = _Deterministic.of(PNDMScheduler)(**BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    elif name == "unipc":  # UniPCMultistepScheduler.from_config of that config
        sched = _Deterministic.of(UniPCMultistepScheduler).from_config(diffusers_scheduler("plms", False).config)
    else:
        sched = DPMSolverMultistepScheduler(
            **BETAS, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
        )
    if steps is None:
        return sched
    sched.set_timesteps(steps)
    if name == "euler_a" and karras:
        # diffusers' ancestral Euler has no Karras option: give it the Karras schedule of its Euler
        ref = EulerDiscreteScheduler(**BETAS, use_karras_sigmas=True)
        ref.set_timesteps(steps)
        sched.sigmas, sched.timesteps = ref.sigmas.clone(), ref.timesteps.clone()
    return sched


def request(prompt: str, *, width: int, height: int, init_image=None, mask=None, strength=None, **fields):
    """A pipeline Request from recipe fields, with images made in memory (named by a label)."""
    from sdbatch.pipeline import Request
    from sdbatch.recipe import Recipe

    if init_image is not None and strength is None:
        strength = 0.75
    recipe = Recipe(
        prompt=prompt,
        size=(width, height),
        init_image=None if init_image is None else "<init image>",
        mask=None if mask is None else "<mask>",
        strength=strength,
        **fields,
    )
    return Request(recipe, init_image, mask)
