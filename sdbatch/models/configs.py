"""Model configs: plain dataclasses, free of torch, so that validating and planning a job (which
read a model's config from its file header) never import torch."""

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    max_positions: int = 77
    layers: int = 12
    heads: int = 12
    mlp: int = 3072


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting checkpoints: latents + mask + masked-image latents
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = 8
    context_dim: int = 768
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    image_channels: int = 3
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents are multiplied by this before the UNet sees them


@dataclass(frozen=True)
class SDConfig:
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    sample_size: int = 512  # the image side it was trained at: a job's size when none is given

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SDConfig":
        """Inverse of `to_dict` (JSON turns tuples into lists); raises TypeError/KeyError on bad data."""

        def part(kind: type, values: dict):
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        return cls(
            name=str(data["name"]),
            unet=part(UNetConfig, data["unet"]),
            vae=part(VAEConfig, data["vae"]),
            clip=part(CLIPConfig, data["clip"]),
            sample_size=int(data.get("sample_size") or getattr(CONFIGS.get(str(data["name"])), "sample_size", 512)),
        )


_SD15 = SDConfig("sd15")
# Small enough to run a forward pass in milliseconds on a CPU; same structure, so every code path
# (attention at some levels only, skip convs, up/downsampling) is exercised.
_TINY = SDConfig(
    "tiny",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        attention_levels=(True, False),
        num_heads=2,
        context_dim=32,
        norm_groups=8,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8),  # f=8 like SD
    clip=CLIPConfig(width=32, layers=2, heads=2, mlp=64),
    sample_size=64,
)

# The shipped demo model (sdbatch.demo.train): 32x32 images, f=4 latents, a 3-layer text encoder with
# 16 positions over the demo vocabulary (< 640 tokens); sized to train in well under an hour on a
# 2-core CPU. Its real scale_factor is measured in training and stored in the weights file's header.
_DEMO = SDConfig(
    "demo",
    unet=UNetConfig(
        model_channels=48,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(False, True, True),
        num_heads=4,
        context_dim=128,
        norm_groups=16,
    ),
    vae=VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, scale_factor=1.0),
    clip=CLIPConfig(vocab_size=640, width=128, max_positions=16, layers=3, heads=4, mlp=512),
    sample_size=32,
)

CONFIGS: dict[str, SDConfig] = {
    "sd15": _SD15,
    "sd15-inpainting": replace(_SD15, name="sd15-inpainting", unet=replace(_SD15.unet, in_channels=9)),
    "demo": _DEMO,
    "tiny": _TINY,
    "tiny-inpainting": replace(_TINY, name="tiny-inpainting", unet=replace(_TINY.unet, in_channels=9)),
}


def get_config(config: "str | SDConfig") -> SDConfig:
    if isinstance(config, SDConfig):
        return config
    try:
        return CONFIGS[config]
    except KeyError:
        raise ValueError(f"unknown model config {config!r}; known: {', '.join(CONFIGS)}") from None
