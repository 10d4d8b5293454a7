"""Model configs: plain dataclasses, free of torch, so that validating and planning a job (which
read a model's config from its file header) never import torch."""

import math
from dataclasses import asdict, dataclass, field, fields, replace


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
        """Inverse of `to_dict` (JSON turns tuples into lists). Raises TypeError/KeyError/ValueError
        on bad data, including values no network can be built from (`config_problems`)."""
        if not isinstance(data, dict):
            raise TypeError(f"a config is a JSON object, not {type(data).__name__}")

        def part(kind: type, values: dict):
            if not isinstance(values, dict):
                raise TypeError(f"{kind.__name__} must be a JSON object, not {type(values).__name__}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        name = data["name"]
        if not isinstance(name, str):
            raise TypeError(f"name must be text, got {name!r}")
        sample_size = data.get("sample_size") or getattr(CONFIGS.get(name), "sample_size", 512)
        cfg = cls(
            name=name,
            unet=part(UNetConfig, data["unet"]),
            vae=part(VAEConfig, data["vae"]),
            clip=part(CLIPConfig, data["clip"]),
            sample_size=sample_size,
        )
        check_config(cfg)
        return cfg


# What a config may hold: every size a positive whole number up to a bound far above SD 1.x's own
# (a config is data from a file; 0 or a string would fail deep inside torch, a huge one would try
# to allocate terabytes), and the relations the networks need.
_BOUNDS = {
    "vocab_size": 1_000_000,
    "width": 16_384,
    "max_positions": 4096,
    "layers": 256,
    "heads": 1024,
    "mlp": 65_536,
    "in_channels": 64,
    "out_channels": 64,
    "model_channels": 8192,
    "num_res_blocks": 16,
    "num_heads": 1024,
    "context_dim": 16_384,
    "norm_groups": 1024,
    "ch": 8192,
    "z_channels": 64,
}


def config_problems(cfg: SDConfig) -> list[str]:
    """What makes a config unusable, as `part.field: what is wrong` (empty when it is fine)."""
    out: list[str] = []

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for part_name in ("unet", "vae", "clip"):
        part = getattr(cfg, part_name)
        for f in fields(part):
            v, bound = getattr(part, f.name), _BOUNDS.get(f.name)
            if bound is not None and (not whole(v) or not 1 <= v <= bound):
                out.append(f"{part_name}.{f.name}: {v!r}; must be a whole number from 1 to {bound:,}")
    u, v, c = cfg.unet, cfg.vae, cfg.clip
    for part_name, mult in (("unet.channel_mult", u.channel_mult), ("vae.ch_mult", v.ch_mult)):
        if not isinstance(mult, tuple) or not 1 <= len(mult) <= 8 or not all(whole(m) and 1 <= m <= 64 for m in mult):
            out.append(f"{part_name}: {mult!r}; must be a list of 1 to 8 whole numbers from 1 to 64")
    levels = u.attention_levels
    if not isinstance(levels, tuple) or not all(isinstance(a, bool) for a in levels):
        out.append(f"unet.attention_levels: {levels!r}; must be a list of true/false")
    elif isinstance(u.channel_mult, tuple) and len(levels) != len(u.channel_mult):
        out.append(f"unet.attention_levels: {len(levels)} levels, but channel_mult has {len(u.channel_mult)}")
    if (
        not isinstance(v.scale_factor, (int, float))
        or isinstance(v.scale_factor, bool)
        or not (math.isfinite(v.scale_factor) and v.scale_factor > 0)
    ):
        out.append(f"vae.scale_factor: {v.scale_factor!r}; must be a number above 0")
    if v.image_channels != 3:
        out.append(f"vae.image_channels: {v.image_channels!r}; must be 3 (RGB)")
    size = cfg.sample_size
    if not whole(size) or not 8 <= size <= 8192 or size % 8:
        out.append(f"sample_size: {size!r}; must be a multiple of 8 from 8 to 8192")
    if out:  # the relations below assume well-typed values
        return out
    for m in u.channel_mult:
        if u.model_channels * m % u.norm_groups:
            out.append(f"unet: {u.model_channels * m} channels do not split into {u.norm_groups} norm groups")
    for m, attention in zip(u.channel_mult, u.attention_levels, strict=True):
        if attention and u.model_channels * m % u.num_heads:
            out.append(f"unet: {u.model_channels * m} channels do not split into {u.num_heads} attention heads")
    for m in (1, *v.ch_mult):
        if v.ch * m % v.norm_groups:
            out.append(f"vae: {v.ch * m} channels do not split into {v.norm_groups} norm groups")
    if len(v.ch_mult) > 4:  # the VAE shrinks by 2 per level after the first: at most 8, so any multiple of 8 renders
        out.append(f"vae.ch_mult: {len(v.ch_mult)} levels shrink images by {2 ** (len(v.ch_mult) - 1)}; at most 4 (8x)")
    if c.width % c.heads:
        out.append(f"clip: width {c.width} does not split into {c.heads} heads")
    if u.context_dim != c.width:
        out.append(f"unet.context_dim {u.context_dim} differs from the text encoder's width {c.width}")
    if u.out_channels != v.z_channels or u.in_channels not in (v.z_channels, 2 * v.z_channels + 1):
        out.append(
            f"unet: {u.in_channels} in / {u.out_channels} out channels do not fit the VAE's {v.z_channels} "
            f"latent channels (in {v.z_channels}, or {2 * v.z_channels + 1} for inpainting; out {v.z_channels})"
        )
    return list(dict.fromkeys(out))


def check_config(cfg: SDConfig) -> SDConfig:
    """The config itself, or ValueError naming what makes it unusable (the first three problems)."""
    problems = config_problems(cfg)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError("; ".join(problems[:3]) + more)
    return cfg


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
