"""Random LoRA / LyCORIS files of every format sdbatch reads, for one of our (tiny) configs.

Layer names come from diffusers' and transformers' own modules, spelled as kohya, LyCORIS, PEFT and the
older diffusers attention processors write them, never from sdbatch's rules: reading these files tests
those rules. Each writer returns the tensors it wrote, so that tests can work the updates out on their own.
"""

import functools
import re
from pathlib import Path

import torch
from helpers import diffusers_unet, transformers_clip
from safetensors.torch import save_file

from sdbatch.models import SDConfig

# the layers kohya's LoRA / LoCon train: attention, feed-forward, projections, ResNet convs (LoCon)
UNET_LAYERS = re.compile(r".*(to_[qkv]|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out|conv[12]|time_emb_proj)$")
TE_LAYERS = re.compile(r".*([qkv]_proj|out_proj|fc[12])$")


@functools.cache
def unet_layers(cfg: SDConfig, conv: bool = True) -> dict[str, tuple[int, ...]]:
    """diffusers module name -> weight shape of the UNet layers a LoRA (with conv: a LoCon) changes."""
    with torch.device("meta"):
        unet = diffusers_unet(cfg)
    found = {}
    for name, module in unet.named_modules():
        wanted = isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and UNET_LAYERS.fullmatch(name)
        if wanted and (conv or getattr(module, "kernel_size", (1, 1)) == (1, 1)):
            found[name] = tuple(module.weight.shape)
    return found


@functools.cache
def te_layers(cfg: SDConfig) -> dict[str, tuple[int, ...]]:
    """`text_model.encoder.layers.0.self_attn.q_proj` (transformers 4 spelling, as kohya writes) -> shape."""
    with torch.device("meta"):
        clip = transformers_clip(cfg)
    return {
        ("" if name.startswith("text_model.") else "text_model.") + name: tuple(module.weight.shape)
        for name, module in clip.named_modules()
        if isinstance(module, torch.nn.Linear) and TE_LAYERS.fullmatch(name)
    }


def kohya_layers(cfg: SDConfig, conv: bool = True) -> dict[str, tuple[int, ...]]:
    """kohya names (`lora_unet_down_blocks_0_..._to_q`, `lora_te_text_model_..._q_proj`) -> shape."""
    unet = {"lora_unet_" + n.replace(".", "_"): s for n, s in unet_layers(cfg, conv).items()}
    return unet | {"lora_te_" + n.replace(".", "_"): s for n, s in te_layers(cfg).items()}


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """.safetensors through safetensors, anything else through torch.save (a pickle, as .pt LoRAs are)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


def _randn(g: torch.Generator, *shape: int, std: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def kohya_lora(
    path: Path, layers: dict[str, tuple[int, ...]], rank: int = 4, alpha: float | None = 2.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """kohya LoRA / LoCon: down [r, in(, kh, kw)], up [out, r(, 1, 1)], alpha."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i, *k) in layers.items():
        out[f"{name}.lora_down.weight"] = _randn(g, rank, i, *k)
        out[f"{name}.lora_up.weight"] = _randn(g, o, rank, *[1] * len(k))
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(alpha)
    save(path, out)
    return out


def locon_tucker(path: Path, layers: dict[str, tuple[int, ...]], rank: int = 3, alpha: float = 1.5, seed: int = 0):
    """LoCon with a CP/Tucker middle for k x k convs: down [r, in, 1, 1], mid [r, r, k, k], up [out, r, 1, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i, *k) in layers.items():
        tucker = len(k) == 2 and k != [1, 1]
        out[f"{name}.lora_down.weight"] = _randn(g, rank, i, *([1, 1] if tucker else k))
        out[f"{name}.lora_up.weight"] = _randn(g, o, rank, *[1] * len(k))
        if tucker:
            out[f"{name}.lora_mid.weight"] = _randn(g, rank, rank, *k)
        out[f"{name}.alpha"] = torch.tensor(alpha)
    save(path, out)
    return out


def loha(
    path: Path,
    layers: dict[str, tuple[int, ...]],
    rank: int = 4,
    alpha: float = 3.0,
    tucker: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa: w1_a [out, r], w1_b [r, in*kh*kw] (x2); Tucker for convs: t [r, r, k, k], a [r, out], b [r, in]."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i, *k) in layers.items():
        for n in (1, 2):
            if tucker and k and k != [1, 1]:
                out[f"{name}.hada_t{n}"] = _randn(g, rank, rank, *k, std=0.5)
                out[f"{name}.hada_w{n}_a"] = _randn(g, rank, o, std=0.5)
                out[f"{name}.hada_w{n}_b"] = _randn(g, rank, i, std=0.5)
            else:
                out[f"{name}.hada_w{n}_a"] = _randn(g, o, rank, std=0.5)
                out[f"{name}.hada_w{n}_b"] = _randn(g, rank, i * (k[0] * k[1] if k else 1), std=0.5)
        out[f"{name}.alpha"] = torch.tensor(alpha)
    save(path, out)
    return out


def lokr(
    path: Path,
    layers: dict[str, tuple[int, ...]],
    rank: int = 2,
    alpha: float = 3.0,
    decompose: tuple[str, ...] = (),
    tucker: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr: W = kron(w1 [a, c], w2 [b, d(, k, k)]), out = a*b, in = c*d; `decompose` names the
    factors stored low-rank (w1_a [a, r] @ w1_b [r, c]; w2_a [b, r] @ w2_b [r, d*k*k], or with `tucker`
    for convs t2 [r, r, k, k], w2_a [r, b], w2_b [r, d])."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i, *k) in layers.items():
        a, c = 2, 2
        b, d = o // a, i // c
        if "w1" in decompose:
            out[f"{name}.lokr_w1_a"], out[f"{name}.lokr_w1_b"] = _randn(g, a, rank), _randn(g, rank, c)
        else:
            out[f"{name}.lokr_w1"] = _randn(g, a, c)
        if "w2" not in decompose:
            out[f"{name}.lokr_w2"] = _randn(g, b, d, *k)
        elif tucker and k and k != [1, 1]:
            out[f"{name}.lokr_t2"] = _randn(g, rank, rank, *k)
            out[f"{name}.lokr_w2_a"], out[f"{name}.lokr_w2_b"] = _randn(g, rank, b), _randn(g, rank, d)
        else:
            flat = d * (k[0] * k[1] if k else 1)
            out[f"{name}.lokr_w2_a"], out[f"{name}.lokr_w2_b"] = _randn(g, b, rank), _randn(g, rank, flat)
        out[f"{name}.alpha"] = torch.tensor(alpha)
    save(path, out)
    return out


def dora(
    path: Path, layers: dict[str, tuple[int, ...]], rank: int = 4, alpha: float = 2.0, side: str = "in", seed: int = 0
) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS DoRA: a LoRA plus dora_scale, the wanted norm of each input column [1, in(, 1, 1)]
    (`side="in"`, as A1111 applies it) or of each output row [out, 1(, 1, 1)] (LyCORIS wd_on_out)."""
    out = kohya_lora(path, layers, rank, alpha, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, (o, i, *k) in layers.items():
        shape = (1, i, *[1] * len(k)) if side == "in" else (o, 1, *[1] * len(k))
        out[f"{name}.dora_scale"] = 0.5 + torch.rand(*shape, generator=g)
    save(path, out)
    return out


def processor_lora(path: Path, cfg: SDConfig, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """The older diffusers attention-processor names: `unet.<attention>.processor.to_q_lora.down.weight`,
    `text_encoder.<layer>.self_attn.to_q_lora.down.weight` (no alpha: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    layers = {f"unet.{n}": s for n, s in unet_layers(cfg).items() if re.search(r"attn[12]\.to_", n)}
    layers |= {f"text_encoder.{n}": s for n, s in te_layers(cfg).items() if "self_attn" in n}
    for name, (o, i) in layers.items():
        head, _, proj = name.rpartition(".")
        if proj == "0":  # to_out.0
            head, proj = head.rpartition(".")[0], "to_out"
        if name.startswith("unet."):
            prefix = f"{head}.processor.{proj}_lora"
        else:
            prefix = f"{head}.to_{proj.removesuffix('_proj')}_lora"
        out[f"{prefix}.down.weight"] = _randn(g, rank, i)
        out[f"{prefix}.up.weight"] = _randn(g, o, rank)
    save(path, out)
    return out


def peft_lora(path: Path, cfg: SDConfig, seed: int = 0) -> Path:
    """A PEFT LoRA made by peft itself on diffusers' UNet and transformers' CLIP (random lora_B, so that
    it does something), saved by diffusers with its adapter metadata: UNet r=4, alpha=6, with one
    alpha_pattern; text encoder r=2, alpha=5."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=6,
        alpha_pattern={"ff.net.2": 2},
        target_modules=[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
            "conv1",
        ],
        init_lora_weights=False,
    )
    te_config = LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        init_lora_weights=False,
    )
    unet, te = diffusers_unet(cfg), transformers_clip(cfg)
    unet.add_adapter(unet_config)
    inject_adapter_in_model(te_config, te)
    path = Path(path)
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        weight_name=path.name,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    return path
