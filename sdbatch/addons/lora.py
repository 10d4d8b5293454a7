"""LoRA / LyCORIS files: which of our weights each one changes, and by how much.

A LoRA file names the layers it changes in the spelling of whatever trained it: kohya's
`lora_unet_<diffusers module path with _>` / `lora_te_<transformers path with _>` (also with LDM paths,
`lora_unet_input_blocks_1_1_...`, as A1111 accepts), PEFT/diffusers' `unet.<module path>.lora_A.weight`,
and the older diffusers attention processors `attn1.processor.to_q_lora.down.weight`. None of these is
a hand-written table here: every name any of them can give one of our layers is computed from our own
module list (`model_names`, through `convert.unet_key`), so a file's name is simply looked up.

Each layer's update is one of the algorithms A1111 merges (`extensions-builtin/Lora/network_*.py`):
LoRA (`up @ down`, with a CP/Tucker `lora_mid` for convolutions; LoCon is LoRA on 3x3 convs), LoHa
(Hadamard product of two low-rank products), LoKr (Kronecker product of two factors, either one
possibly low-rank) and DoRA on top of any of them (`dora_scale`). Scale = alpha / rank as kohya and
LyCORIS train it (alpha missing or 0: 1; LoKr with no low-rank factor: 1).

Reading and checking a file needs no torch (headers only), so a job can refuse an SDXL LoRA or one that
does not fit the model before anything is loaded; torch is imported when an update is computed.
"""

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoints.kinds import detect_kind
from ..checkpoints.read import SHOW, CheckpointError, TensorRef, read_weights
from ..convert import PREFIXES, unet_key
from ..models.configs import UNetConfig

if TYPE_CHECKING:
    import torch

UNET, TEXT = PREFIXES["unet"], PREFIXES["text_encoder"]
CONV_IN = UNET + "input_blocks.0.0.weight"  # 9 input channels in inpainting models, 4 in the LoRAs for them

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# What the end of a key names: (part, naming family). Tried longest first, after a ".".
_ENDINGS = {
    "lora_down.weight": ("down", "kohya"),
    "lora_up.weight": ("up", "kohya"),
    "lora_mid.weight": ("mid", "kohya"),
    "lora_A.weight": ("down", "peft"),
    "lora_B.weight": ("up", "peft"),
    "lora.down.weight": ("down", "diffusers"),
    "lora.up.weight": ("up", "diffusers"),
    "lora_linear_layer.down.weight": ("down", "diffusers"),
    "lora_linear_layer.up.weight": ("up", "diffusers"),
    "alpha": ("alpha", None),
    "dora_scale": ("dora_scale", None),
    **{p: (p, None) for p in (*_LOHA, *_LOKR)},
}
_BY_LENGTH = sorted(_ENDINGS, key=len, reverse=True)
# older diffusers attention processors: `<attention>.processor.to_q_lora.down.weight` (UNet) and
# `<layer>.self_attn.to_q_lora.down.weight` (text encoder) hold the LoRA of `to_q` / `q_proj`
_PROCESSOR = re.compile(r"(.+?)(\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight")
# parts each algorithm may have, beyond the ones it needs (`_kind`)
_ALLOWED = {
    "lora": {"down", "up", "mid", "alpha", "dora_scale"},
    "loha": {*_LOHA, "alpha", "dora_scale"},
    "lokr": {*_LOKR, "alpha", "dora_scale"},
}
# LyCORIS algorithms (and PEFT's own DoRA) that A1111 or LyCORIS can load but sdbatch does not merge:
# the last part of a key (LyCORIS' `weight_list_det`) names them, for the refusal to say
_UNSUPPORTED = {
    "oft_blocks": "LyCORIS OFT / BOFT",
    "diff": "LyCORIS full (diff)",
    "on_input": "LyCORIS IA3",
    "w_norm": "LyCORIS norm",
    "a1.weight": "LyCORIS GLoRA",
    "lora_magnitude_vector": "PEFT DoRA (lora_magnitude_vector)",
    "lora_magnitude_vector.weight": "PEFT DoRA (lora_magnitude_vector)",
    "wd_for_diff": "LyCORIS DoRA of the difference (wd_for_diff)",
}
SUPPORTED = "LoRA, LoCon, LoHa, LoKr and DoRA"
# what a layer's input width says about the model a LoRA was made for, where it is not this model's:
# the UNet's cross-attention to_k/to_v read the text encoder's output, whose q/k/v/out read its width
_FAMILIES = {1024: "an SD 2.x LoRA", 1280: "an SDXL LoRA", 2048: "an SDXL LoRA"}
_WIDTH_LAYERS = re.compile(r".*(attn2[._](processor[._])?to_[kv]|self_attn[._]([qkv]|out)_proj)$")
_SDXL_NAMES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata: the LoraConfig per component


class LoraError(CheckpointError):
    """A LoRA file that cannot be merged into this model; the message names the file and why."""


@dataclass(frozen=True, eq=False)
class Patch:
    """The update one LoRA file makes to one of our weights, read from the file when asked for."""

    key: str  # our weight key, e.g. model.diffusion_model.input_blocks.1.1.proj_in.weight
    name: str  # the layer's name in the file, for messages
    kind: str  # "lora" | "loha" | "lokr" (the low-rank algorithm; `dora` says whether DoRA is on top)
    text_encoder: bool  # else UNet: which multiplier of a <lora:name:te:unet> applies
    shape: tuple[int, ...]  # the weight's shape
    rank: int | None  # what alpha is divided by; None: a LoKr without a low-rank factor (scale 1)
    tensors: Mapping[str, TensorRef] = field(repr=False)
    alpha: float | None = None  # from the file's metadata (PEFT); a module's own `alpha` tensor wins
    rs_lora: bool = False  # PEFT's rank-stabilised scale alpha / sqrt(rank)
    dora: str | None = None  # DoRA: "in" = dora_scale holds the norm of each input column (as A1111
    # applies it), "out" = of each output row (LyCORIS wd_on_out); None: no DoRA

    def delta(self, weight: "torch.Tensor") -> "torch.Tensor":
        """The float32 update of `weight` for multiplier 1, on its device: W' = W + multiplier * delta.
        DoRA's update depends on the weight it is added to, hence the argument."""
        import torch

        t = {k: ref.load().to(weight.device, torch.float32) for k, ref in self.tensors.items()}
        update = _fit(_UPDOWN[self.kind](t), self.shape) * self._scale(t)
        if self.dora is None:
            return update
        return _decompose(update, weight.float(), t["dora_scale"], self.dora)

    def _scale(self, t: dict[str, Any]) -> float:
        alpha = float(t["alpha"]) if "alpha" in t else self.alpha
        if self.rank is None or not alpha:  # kohya / LyCORIS: alpha missing or 0 means alpha = rank
            return 1.0
        return alpha / (math.sqrt(self.rank) if self.rs_lora else self.rank)


@dataclass(eq=False)  # eq=False: the Merger tells LoRA sets apart by the identity of their files
class LoraFile:
    path: Path
    format: str  # "kohya LoRA", "LoCon", "LoHa", "LoKr", "PEFT LoRA", "diffusers LoRA", "DoRA" (or "a + b")
    patches: dict[str, Patch]  # by our weight key
    metadata: dict[str, str]
    skipped: tuple[str, ...] = ()  # keys not merged: textual-inversion embeddings bundled in the file

    def loaded(self) -> "LoraFile":
        """The same LoRA with every tensor read into memory now and checked to be finite, so that
        what is merged is what was hashed (a file rewritten in place later changes nothing), and a
        damaged file is refused naming its layer rather than giving NaN images."""
        import torch

        patches = {}
        for key, patch in self.patches.items():
            tensors = {}
            for part, ref in patch.tensors.items():
                tensor = ref.load().clone()  # a copy: a memory-mapped tensor would follow the file
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise LoraError(f"{self.path}: {patch.name}.{part} holds NaN or infinite values")
                tensors[part] = TensorRef(ref.shape, lambda t=tensor: t)
            patches[key] = replace(patch, tensors=tensors)
        return replace(self, patches=patches)


def read_lora(path: str | Path, shapes: Mapping[str, tuple[int, ...]], unet_config: UNetConfig) -> LoraFile:
    """The patches a LoRA file makes to a model whose state-dict shapes are `shapes`, or LoraError
    saying why it cannot be merged (wrong model family, layers the model lacks, shapes that do not fit,
    an algorithm sdbatch does not merge). Reads headers only: no tensor is loaded, no torch imported."""
    path = Path(path)
    weights = read_weights(path)
    modules, unknown, skipped = _group(weights.tensors)
    algorithm = _unsupported(unknown)
    if algorithm:
        raise LoraError(f"{path}: uses {algorithm}, which sdbatch does not merge; it merges {SUPPORTED}")
    if not modules:
        raise LoraError(f"{path}: not a LoRA: {_describe(weights.shapes())}")
    family = _family(modules, weights.metadata, unet_config.context_dim)
    if family:
        raise LoraError(f"{path}: is {family}; sdbatch renders SD 1.x")
    if unknown:
        shown = ", ".join(unknown[:SHOW]) + (", ..." if len(unknown) > SHOW else "")
        raise LoraError(f"{path}: has keys that are no LoRA weights sdbatch knows ({shown})")
    names = model_names(shapes, unet_config)
    missing = [m.name for m in modules.values() if m.kind and _lookup(m.name, names) is None]
    if missing:
        raise LoraError(
            f"{path}: {len(missing)} of its {len(modules)} layers are not in this model "
            f"({', '.join(missing[:SHOW])}{', ...' if len(missing) > SHOW else ''}); is it a LoRA for another model?"
        )
    peft = _peft_configs(path, weights.metadata)
    patches: dict[str, Patch] = {}
    for module in modules.values():
        if module.kind is None:  # an `alpha` with no weights: nothing to merge
            continue
        key = _lookup(module.name, names)
        if key in patches:
            raise LoraError(f"{path}: {patches[key].name} and {module.name} both change {key}")
        patches[key] = _patch(path, module, key, tuple(shapes[key]), peft)
    if not patches:
        raise LoraError(f"{path}: holds LoRA alphas but no LoRA weights")
    return LoraFile(path, _format(patches.values(), modules), patches, weights.metadata, tuple(skipped))


def model_names(shapes: Mapping[str, tuple[int, ...]], unet_config: UNetConfig) -> dict[str, str]:
    """Every name a LoRA file may give one of our layers -> that layer's weight key. Computed from our
    own keys: kohya (diffusers or LDM paths, `_` for `.`), PEFT/diffusers (with or without the component
    prefix; the text encoder with or without transformers 4's `text_model.` level)."""
    names: dict[str, str] = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue  # norms, biases, buffers: no LoRA changes them
        path = key.removesuffix(".weight")
        if key.startswith(UNET):
            ldm = path.removeprefix(UNET)
            try:
                diffusers = unet_key(ldm + ".weight", unet_config).removesuffix(".weight")
            except (KeyError, ValueError, IndexError):
                continue  # a key of no SD1 UNet (header shapes of an odd file): nothing can name it
            aliases = [f"lora_unet_{_flat(diffusers)}", f"lora_unet_{_flat(ldm)}", f"unet.{diffusers}", diffusers]
        elif key.startswith(TEXT):
            full = path.removeprefix(TEXT)  # text_model.encoder.layers.0.self_attn.q_proj
            short = full.removeprefix("text_model.")
            aliases = [f"lora_te_{_flat(p)}" for p in (full, short)] + [f"text_encoder.{p}" for p in (full, short)]
            aliases += [full, short]
        else:
            continue  # the VAE: LoRAs do not change it
        names.update(dict.fromkeys(aliases, key))
    return names


# ----------------------------------------------------------------------------------------------------
# grouping a file's keys into layers


@dataclass
class _Module:
    name: str  # as the file spells it, less the part
    refs: dict[str, TensorRef] = field(default_factory=dict)
    family: str | None = None  # "kohya" / "peft" / "diffusers": how its LoRA weights were named

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {part: ref.shape for part, ref in self.refs.items()}

    @property
    def kind(self) -> str | None:
        return _kind(set(self.refs))


def _group(tensors: Mapping[str, TensorRef]) -> tuple[dict[str, _Module], list[str], list[str]]:
    """(layers by name, keys that are no LoRA part sdbatch knows, keys deliberately skipped)."""
    modules: dict[str, _Module] = {}
    unknown: list[str] = []
    skipped: list[str] = []
    for key, ref in tensors.items():
        if key.startswith("bundle_emb."):
            skipped.append(key)
            continue
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        name, part, family = split
        module = modules.setdefault(name, _Module(name))
        module.refs[part] = ref
        module.family = family or module.family
    return modules, unknown, skipped


def _split(key: str) -> tuple[str, str, str | None] | None:
    """`lora_unet_x.lora_down.weight` -> ("lora_unet_x", "down", "kohya"); None for no known part."""
    for ending in _BY_LENGTH:
        if key.endswith("." + ending):
            return (key[: -len(ending) - 1], *_ENDINGS[ending])
    m = _PROCESSOR.fullmatch(key)
    if m is None:
        return None
    base, processor, target, part = m.groups()
    if processor:  # a UNet attention: to_q, to_k, to_v, to_out.0
        return f"{base}.to_{target}{'.0' if target == 'out' else ''}", part, "diffusers"
    return f"{base}.{target}_proj", part, "diffusers"  # the text encoder's self_attn: q_proj ... out_proj


def _kind(parts: set[str]) -> str | None:
    """Which algorithm a layer's parts make: "lora", "loha", "lokr"; "incomplete" for parts that make
    none (refused in `_patch`); None for an `alpha` alone (nothing to merge)."""
    if {"down", "up"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "loha"
    w1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    w2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    if w1 and w2:
        return "lokr"
    if parts - {"alpha"}:
        return "incomplete"
    return None


def _lookup(name: str, names: Mapping[str, str]) -> str | None:
    return names.get(name) or names.get(name.removeprefix("base_model.model."))


def _flat(path: str) -> str:
    return path.replace(".", "_")


# ----------------------------------------------------------------------------------------------------
# what a file is when it is no LoRA for this model


def _describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return f"it looks like {detect_kind(shapes).description}" if shapes else "it holds no tensors"


def _family(modules: Mapping[str, _Module], metadata: Mapping[str, str], width: int) -> str | None:
    """The other model family ("an SDXL LoRA", "an SD 2.x LoRA") that names, kohya's metadata or the
    widths of the layers reading text say the file was made for; None if none."""
    sdxl_names = any(name.startswith(_SDXL_NAMES) for name in modules)
    if sdxl_names or str(metadata.get("ss_base_model_version", "")).startswith("sdxl"):
        return "an SDXL LoRA"
    if str(metadata.get("ss_v2", "")) == "True":
        return "an SD 2.x LoRA"
    for module in modules.values():
        if module.kind in _NATURAL and _WIDTH_LAYERS.fullmatch(module.name):
            try:
                wide = _NATURAL[module.kind](module.shapes)[0][1]
            except (ValueError, KeyError, IndexError):
                continue  # inconsistent shapes: `_patch` says so
            if wide != width and wide in _FAMILIES:
                return _FAMILIES[wide]
    return None


def _unsupported(unknown: list[str]) -> str | None:
    """The algorithm sdbatch does not merge that some of these keys belong to, with an example key."""
    for marker, name in _UNSUPPORTED.items():
        found = [key for key in unknown if key.endswith("." + marker)]
        if found:
            return f"{name} (e.g. {found[0]})"
    return None


# ----------------------------------------------------------------------------------------------------
# one layer: check its shapes against the model's weight (no torch), then build its Patch


def _patch(path: Path, module: _Module, key: str, target: tuple[int, ...], peft: Mapping[str, dict]) -> Patch:
    shapes, kind = module.shapes, module.kind
    if kind == "incomplete" or set(shapes) - _ALLOWED[kind]:
        parts = ", ".join(sorted(shapes))
        raise LoraError(f"{path}: {module.name} has parts ({parts}) that make no LoRA, LoHa or LoKr layer")
    try:
        natural, rank = _NATURAL[kind](shapes)
    except (ValueError, KeyError, IndexError) as e:
        raise LoraError(f"{path}: {module.name}: {e}") from None
    if rank == 0 or 0 in natural or math.prod(shapes.get("alpha", ())) != 1:
        raise LoraError(f"{path}: {module.name} is empty or has an alpha that is no single number")
    if not _fits(natural, target, key):
        raise LoraError(f"{path}: {module.name} makes a {list(natural)} update, but {key} is {list(target)}")
    dora = None
    if "dora_scale" in shapes:
        dora = _dora_side(shapes["dora_scale"], target)
        if dora is None:
            raise LoraError(
                f"{path}: {module.name}.dora_scale is {list(shapes['dora_scale'])}, {key} is {list(target)}"
            )
    alpha, rs = _peft_alpha(peft, module, key) if module.family == "peft" else (None, False)
    return Patch(key, module.name, kind, key.startswith(TEXT), target, rank, module.refs, alpha, rs, dora)


def _lora_shape(s: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...], int | None]:
    up, down = s["up"], s["down"]
    rank = down[0]
    if len(up) not in (2, 4) or len(down) not in (2, 4) or any(n != 1 for n in up[2:]):
        raise ValueError(f"lora_up {list(up)} / lora_down {list(down)} are no linear or conv LoRA")
    if "mid" not in s:
        if up[1] != rank:
            raise ValueError(f"lora_up {list(up)} does not chain with lora_down {list(down)}")
        return (up[0], *down[1:]), rank
    mid = s["mid"]  # CP / Tucker: up [out, r] . mid [r, r, kh, kw] . down [r, in]
    if len(mid) != 4 or mid[:2] != (up[1], rank) or any(n != 1 for n in down[2:]):
        raise ValueError(f"lora_up {list(up)}, lora_mid {list(mid)}, lora_down {list(down)} do not chain")
    return (up[0], down[1], *mid[2:]), rank


def _loha_shape(s: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...], int | None]:
    halves = []
    for i in (1, 2):
        a, b, t = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"], s.get(f"hada_t{i}")
        if ("hada_t1" in s) != ("hada_t2" in s):
            raise ValueError("has one of hada_t1 / hada_t2 without the other")
        if t is None and a[1] == b[0]:  # a [out, r] @ b [r, in(*kh*kw)]
            halves.append((a[0], *b[1:]))
        elif t is not None and len(t) == 4 and t[:2] == (a[0], b[0]):  # Tucker: a [r, out], b [r, in]
            halves.append((a[1], b[1], *t[2:]))
        else:
            raise ValueError(f"hada_w{i}_a {list(a)} and hada_w{i}_b {list(b)} do not chain")
    if halves[0] != halves[1]:
        raise ValueError(f"its two Hadamard factors differ in shape ({list(halves[0])} and {list(halves[1])})")
    return halves[0], s["hada_w1_b"][0]


def _lokr_shape(s: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...], int | None]:
    w1 = s.get("lokr_w1") or _chain(s["lokr_w1_a"], s["lokr_w1_b"], "lokr_w1")
    if "lokr_w2" in s:
        w2 = s["lokr_w2"]
    elif "lokr_t2" in s:  # Tucker: a [r, b], b [r, d], t [r, r, kh, kw]
        a, b, t = s["lokr_w2_a"], s["lokr_w2_b"], s["lokr_t2"]
        if len(t) != 4 or t[:2] != (a[0], b[0]):
            raise ValueError(f"lokr_t2 {list(t)} does not chain with lokr_w2_a {list(a)}, lokr_w2_b {list(b)}")
        w2 = (a[1], b[1], *t[2:])
    else:
        w2 = _chain(s["lokr_w2_a"], s["lokr_w2_b"], "lokr_w2")
    if len(w1) != 2 or len(w2) not in (2, 4):
        raise ValueError(f"Kronecker factors {list(w1)} and {list(w2)} are no linear or conv update")
    rank = s["lokr_w2_b"][0] if "lokr_w2_b" in s else s["lokr_w1_b"][0] if "lokr_w1_b" in s else None
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:]), rank


def _chain(a: tuple[int, ...], b: tuple[int, ...], name: str) -> tuple[int, ...]:
    if len(a) != 2 or a[1] != b[0]:
        raise ValueError(f"{name}_a {list(a)} does not chain with {name}_b {list(b)}")
    return (a[0], *b[1:])


_NATURAL: dict[str, Callable[[Mapping[str, tuple[int, ...]]], tuple[tuple[int, ...], int | None]]] = {
    "lora": _lora_shape,
    "loha": _loha_shape,
    "lokr": _lokr_shape,
}


def _fits(natural: tuple[int, ...], target: tuple[int, ...], key: str) -> bool:
    """Same size and outputs (a 1x1 conv and a linear layer are one matrix; LyCORIS flattens conv
    kernels into the input side), or a 4-channel conv_in update for a 9-channel inpainting conv_in,
    which A1111 pads with zeros."""
    if natural[0] != target[0]:
        return False
    if math.prod(natural) == math.prod(target):
        return True
    return key == CONV_IN and len(natural) == 4 and natural[2:] == target[2:] and natural[1] < target[1]


def _dora_side(scale: tuple[int, ...], target: tuple[int, ...]) -> str | None:
    if scale[0] == 1 and math.prod(scale) == target[1]:
        return "in"
    if scale[0] == target[0] and math.prod(scale) == target[0]:
        return "out"
    return None


def _format(patches: Any, modules: Mapping[str, _Module]) -> str:
    labels: dict[str, None] = {}
    for patch in patches:
        family = modules[patch.name].family
        if patch.dora:
            label = "DoRA"
        elif patch.kind != "lora":
            label = {"loha": "LoHa", "lokr": "LoKr"}[patch.kind]
        elif family in ("peft", "diffusers"):
            label = "PEFT LoRA" if family == "peft" else "diffusers LoRA"
        elif "mid" in patch.tensors or any(n != 1 for n in patch.tensors["down"].shape[2:]):
            label = "LoCon"
        else:
            label = "kohya LoRA"
        labels[label] = None
    if "LoCon" in labels:
        labels.pop("kohya LoRA", None)  # a LoCon also changes linear layers, as plain LoRA
    return " + ".join(labels) or "LoRA"


# ----------------------------------------------------------------------------------------------------
# PEFT's scale comes from diffusers' metadata: {"unet.r": 4, "unet.lora_alpha": 8, ...}


def _peft_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict]:
    raw = metadata.get(PEFT_METADATA)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
        if not isinstance(flat, dict):
            raise TypeError("not a mapping")
    except (ValueError, TypeError) as e:
        raise LoraError(f"{path}: its {PEFT_METADATA} is not valid JSON ({e})") from None
    configs: dict[str, dict] = {}
    for name, value in flat.items():
        component, _, option = str(name).partition(".")
        configs.setdefault(component, {})[option] = value
    return configs


def _peft_alpha(configs: Mapping[str, dict], module: _Module, key: str) -> tuple[float | None, bool]:
    """PEFT's lora_alpha for one layer (its alpha_pattern first), and whether the scale is rsLoRA's."""
    config = configs.get("text_encoder" if key.startswith(TEXT) else "unet")
    if not config or config.get("lora_alpha") is None:
        return None, False
    path = module.name.removeprefix("base_model.model.")
    path = path.removeprefix("unet.").removeprefix("text_encoder.")
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    try:
        return float(alpha), bool(config.get("use_rslora"))
    except (TypeError, ValueError):
        return None, False


# ----------------------------------------------------------------------------------------------------
# the updates themselves (torch, float32 on the weight's device)


def _cp(t: "torch.Tensor", a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """A Tucker-decomposed conv kernel: core t [r1, r2, kh, kw], a [r1, out], b [r2, in]."""
    import torch

    return torch.einsum("ijkl,ip,jr->prkl", t, a, b)


def _lora_updown(t: dict) -> "torch.Tensor":
    import torch

    up, down = t["up"].flatten(1), t["down"]
    if "mid" in t:
        return torch.einsum("nmkl,in,mj->ijkl", t["mid"], up, down.flatten(1))
    return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def _loha_updown(t: dict) -> "torch.Tensor":
    if "hada_t1" in t:
        return _cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * _cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    w1 = t["hada_w1_a"] @ t["hada_w1_b"].flatten(1)
    w2 = t["hada_w2_a"] @ t["hada_w2_b"].flatten(1)
    return (w1 * w2).reshape(w1.shape[0], *t["hada_w1_b"].shape[1:])


def _lokr_updown(t: dict) -> "torch.Tensor":
    import torch

    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        b = t["lokr_w2_b"]
        w2 = (t["lokr_w2_a"] @ b.flatten(1)).reshape(-1, *b.shape[1:])
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


_UPDOWN: dict[str, Callable[[dict], "torch.Tensor"]] = {
    "lora": _lora_updown,
    "loha": _loha_updown,
    "lokr": _lokr_updown,
}


def _fit(update: "torch.Tensor", shape: tuple[int, ...]) -> "torch.Tensor":
    """`update` in the weight's shape (the cases `_fits` allows)."""
    import torch

    if update.numel() == math.prod(shape):
        return update.reshape(shape)
    pad = torch.zeros(shape[0], shape[1] - update.shape[1], *shape[2:], device=update.device)
    return torch.cat([update, pad], dim=1)  # inpainting conv_in: the extra input channels are unchanged


def _decompose(update: "torch.Tensor", weight: "torch.Tensor", scale: "torch.Tensor", side: str) -> "torch.Tensor":
    """DoRA as A1111 merges it (`network.py`, `apply_weight_decompose`): W + update is rescaled so that
    the norm of each input column (or output row, for LyCORIS' wd_on_out) is dora_scale; the result
    minus W is the update, so that a multiplier scales it linearly as A1111 does."""
    merged = weight + update
    if side == "in":
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        view = (1, -1, *[1] * (merged.ndim - 2))
    else:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        view = (-1, *[1] * (merged.ndim - 1))
    return merged * (scale.reshape(view) / norm.reshape(view)) - weight
