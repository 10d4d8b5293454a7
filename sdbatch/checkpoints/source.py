"""A model on disk, behind one type: a single checkpoint file or a diffusers folder.

Everything that differs between the two (where the config comes from, how tensors are named, how
the model is hashed, what it recommends) is a method here, so no other code branches on the
layout. Torch-free until a tensor is actually read.
"""

import hashlib
import json
from collections.abc import Callable, Iterable
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from ..convert import LEGACY_VAE_ATTN, PREFIXES, diffusers_key, is_vae_attn_matrix
from ..models.configs import CONFIGS, CLIPConfig, SDConfig, UNetConfig, VAEConfig, check_config
from .hashing import file_sha256
from .kinds import VAE_PREFIX, Kind, detect_kind
from .read import CheckpointError, TensorRef, WeightsFile, read_weights

CONFIG_METADATA_KEY = "sdbatch.config"  # our SDConfig as JSON, in the safetensors header of files we write
DEFAULTS_METADATA_KEY = "sdbatch.defaults"  # settings the maker recommends, e.g. {"cfg": 4.0}


class ModelSource:
    """What every model on disk can say about itself without loading its weights."""

    path: Path

    @property
    def kind(self) -> Kind:
        raise NotImplementedError

    def config(self) -> SDConfig:
        raise NotImplementedError

    def require_loadable(self) -> None:
        kind = self.kind
        if not kind.loadable:
            raise CheckpointError(
                f"{self.path}: {kind.description}; sdbatch loads SD 1.x checkpoints "
                "(normal or 9-channel inpainting) only"
            )

    def defaults(self) -> dict[str, Any]:
        """Settings the model's maker recommends; jobs use them where they set nothing themselves."""
        return {}

    def sha256(self) -> str:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        return {}

    def tokenizer_folder(self) -> Path:
        """Where a tokenizer shipped with this model would be."""
        raise NotImplementedError

    def view(self, keys: Iterable[str], cfg: SDConfig) -> dict[str, TensorRef]:
        """LDM-keyed references to the tensors (those of `keys` the model has)."""
        raise NotImplementedError


class SingleFile(ModelSource):
    """An LDM-layout `.safetensors` / `.ckpt` file: tensor names are our module names."""

    def __init__(self, path: Path):
        self.path = path

    @cached_property
    def weights(self) -> WeightsFile:
        return read_weights(self.path)

    @property
    def kind(self) -> Kind:
        return detect_kind(self.weights.shapes())

    def config(self) -> SDConfig:
        self.require_loadable()
        stored = self.weights.metadata.get(CONFIG_METADATA_KEY)
        if stored is None:
            return CONFIGS["sd15-inpainting" if self.kind.name == "sd1-inpainting" else "sd15"]
        try:
            return SDConfig.from_dict(json.loads(stored))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}: its '{CONFIG_METADATA_KEY}' metadata is not JSON ({e})") from None
        except KeyError as e:
            raise CheckpointError(f"{self.path}: its '{CONFIG_METADATA_KEY}' metadata lacks {e}") from None
        except (ValueError, TypeError, RecursionError) as e:
            raise CheckpointError(
                f"{self.path}: its '{CONFIG_METADATA_KEY}' metadata is not a usable config ({_short(e)})"
            ) from None

    def defaults(self) -> dict[str, Any]:
        stored = self.weights.metadata.get(DEFAULTS_METADATA_KEY)
        try:
            data = json.loads(stored) if stored else {}
        except json.JSONDecodeError:
            return {}
        cfg = data.get("cfg") if isinstance(data, dict) else None
        return {"cfg": float(cfg)} if isinstance(cfg, (int, float)) and 0 <= cfg <= 100 else {}

    def sha256(self) -> str:
        return file_sha256(self.path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.weights.shapes()

    def metadata(self) -> dict[str, str]:
        return self.weights.metadata

    def tokenizer_folder(self) -> Path:
        return self.path.parent / "tokenizer"  # our own files ship one there (weights/demo/tokenizer)

    def view(self, keys: Iterable[str], cfg: SDConfig) -> dict[str, TensorRef]:
        return dict(self.weights.tensors)


class DiffusersFolder(ModelSource):
    """A diffusers pipeline folder (unet/, vae/, text_encoder/ with config.json each)."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def kind(self) -> Kind:
        inpainting = self.config().unet.in_channels == 9
        return Kind("sd1-inpainting" if inpainting else "sd1", "an SD 1.x diffusers folder")

    def config(self) -> SDConfig:
        return config_from_diffusers(self.path)

    def files(self) -> dict[str, Path]:
        return {c: component_file(self.path / c) for c in PREFIXES}

    def sha256(self) -> str:
        """The sha256 of its component files' sha256s, in order."""
        parts = [f"{c}/{f.name}:{file_sha256(f)}" for c, f in self.files().items()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"{c}/{k}": s for c, f in self.files().items() for k, s in read_weights(f).shapes().items()}

    def tokenizer_folder(self) -> Path:
        return self.path / "tokenizer"

    def view(self, keys: Iterable[str], cfg: SDConfig) -> dict[str, TensorRef]:
        return diffusers_view({c: read_weights(f) for c, f in self.files().items()}, keys, cfg)


def vae_view(path: Path, keys: Iterable[str], cfg: SDConfig) -> dict[str, TensorRef]:
    """VAE weights (LDM-keyed refs to those of `keys` it has) from a VAE file (LDM keys with or
    without `first_stage_model.`, or diffusers keys), a diffusers VAE folder, a full diffusers
    folder, or a full SD1 checkpoint; CheckpointError when `path` holds no VAE."""
    keys = [k for k in keys if k.startswith(VAE_PREFIX)]
    if path.is_dir():
        folder = path / "vae" if is_diffusers_folder(path) else path
        return diffusers_view({"vae": read_weights(component_file(folder))}, keys, cfg)
    weights = read_weights(path)
    kind = detect_kind(weights.shapes())
    if kind.name == "vae-diffusers":
        return diffusers_view({"vae": weights}, keys, cfg)
    if kind.name in ("sd1-vae", "sd1", "sd1-inpainting"):
        view = {}
        for key, ref in weights.tensors.items():
            if key.startswith(VAE_PREFIX):
                view[key] = ref
            elif key.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
                view[VAE_PREFIX + key] = ref
        return view
    raise CheckpointError(f"{path}: given as a VAE but it is {kind.description}")


def spot_shapes(cfg: SDConfig) -> dict[str, tuple[int, ...]]:
    """A few tensors whose shapes follow from each config value (channels, heads' context, latent
    channels, vocabulary, positions, layers): enough to tell, torch-free and from headers alone,
    whether a file fits its config. Loading checks every tensor (`load.check_tensors`)."""
    u, v, c = cfg.unet, cfg.vae, cfg.clip
    unet, vae, text = PREFIXES["unet"], PREFIXES["vae"], PREFIXES["text_encoder"] + "text_model."
    mc = u.model_channels
    shapes = {
        f"{unet}input_blocks.0.0.weight": (mc, u.in_channels, 3, 3),
        f"{unet}out.2.weight": (u.out_channels, mc, 3, 3),
        f"{unet}time_embed.0.weight": (u.time_embed_dim, mc),
        f"{vae}encoder.conv_in.weight": (v.ch, v.image_channels, 3, 3),
        f"{vae}decoder.conv_in.weight": (v.ch * v.ch_mult[-1], v.z_channels, 3, 3),
        f"{vae}quant_conv.weight": (2 * v.z_channels, 2 * v.z_channels, 1, 1),
        f"{vae}post_quant_conv.weight": (v.z_channels, v.z_channels, 1, 1),
        f"{text}embeddings.token_embedding.weight": (c.vocab_size, c.width),
        f"{text}embeddings.position_embedding.weight": (c.max_positions, c.width),
        f"{text}encoder.layers.{c.layers - 1}.mlp.fc1.weight": (c.mlp, c.width),
    }
    for level, (mult, attention) in enumerate(zip(u.channel_mult, u.attention_levels, strict=True)):
        if attention:  # the first attention block: its cross-attention reads the text encoder's width
            block = 1 + level * (u.num_res_blocks + 1)
            key = f"{unet}input_blocks.{block}.1.transformer_blocks.0.attn2.to_k.weight"
            shapes[key] = (mc * mult, u.context_dim)
            break
    return shapes


def check_model_files(path: Path, vae: Path | None = None) -> SDConfig:
    """Everything about a model and its VAE that can be known without torch and without reading
    weights: each file's header, kind and config, and the shapes of `spot_shapes` in both. The
    config, or CheckpointError naming the file and what does not fit. (`sdbatch validate`.)"""
    source = open_model(path)
    source.require_loadable()
    cfg = source.config()
    wanted = spot_shapes(cfg)
    view = source.view(wanted, cfg)
    if vae is not None:
        vae = Path(vae)
        if not vae.exists():
            raise CheckpointError(f"{vae}: no such file (given as the VAE)")
        vae_refs = vae_view(vae, wanted, cfg)
        _fits(vae, cfg, {k: s for k, s in wanted.items() if k.startswith(VAE_PREFIX)}, vae_refs, "VAE ")
        wanted = {k: s for k, s in wanted.items() if not k.startswith(VAE_PREFIX)}
    elif not any(k.startswith(VAE_PREFIX) for k in view):
        raise CheckpointError(f"{source.path}: the file has no VAE: give one with `vae:` (or --vae)")
    _fits(source.path, cfg, wanted, view, "")
    return cfg


def _fits(path: Path, cfg: SDConfig, wanted: dict[str, tuple[int, ...]], view: dict[str, TensorRef], what: str) -> None:
    missing = [k for k in wanted if k not in view]
    wrong = [
        f"{k} {list(view[k].shape)} (config wants {list(s)})"
        for k, s in wanted.items()
        if k in view and tuple(view[k].shape) != s
    ]
    problems = []
    if missing:
        problems.append(f"{what}tensors missing: {', '.join(missing[:3])}")
    if wrong:
        problems.append(f"{what}tensors of the wrong shape: {', '.join(wrong[:3])}")
    if problems:
        raise CheckpointError(f"{path}: does not fit model config '{cfg.name}': " + "; ".join(problems))


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def open_model(path: str | Path) -> ModelSource:
    """The model at `path` (a file, or a diffusers folder); CheckpointError for anything else."""
    path = Path(path)
    if is_diffusers_folder(path):
        return DiffusersFolder(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: a folder but not a diffusers model (no model_index.json or unet/); "
            "pass the .safetensors/.ckpt file itself"
        )
    return SingleFile(path)


# ----------------------------------------------------------------------------------------------------
# diffusers folders: files, configs, key rules


_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
)


def component_file(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing (no such folder)"
    raise CheckpointError(f"{folder}: no weights file ({' / '.join(_WEIGHT_NAMES[:2])}, ...); found {found}")


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > 2**20:
            raise CheckpointError(f"{path}: larger than 1 MB, which no config.json is")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (every diffusers component folder has a config.json)") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({_short(e)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a config (a JSON object); it holds {type(data).__name__}")
    return data


def config_from_diffusers(folder: Path) -> SDConfig:
    """Our SDConfig from a diffusers pipeline folder's unet/vae/text_encoder config.json files."""
    if (folder / "text_encoder_2").is_dir():
        raise CheckpointError(
            f"{folder}: this is an SDXL diffusers folder (it has text_encoder_2/); sdbatch supports SD 1.x only"
        )
    if (folder / "model_index.json").is_file():
        pipeline = _read_json(folder / "model_index.json").get("_class_name")
        if isinstance(pipeline, str) and "XL" in pipeline:
            raise CheckpointError(f"{folder}: a {pipeline} folder; sdbatch supports SD 1.x only")
    unet, vae, text = (_read_json(folder / c / "config.json") for c in ("unet", "vae", "text_encoder"))
    heads = unet.get("attention_head_dim", 8)
    if (
        text.get("hidden_size") != unet.get("cross_attention_dim")
        or unet.get("use_linear_projection")
        or isinstance(heads, list)
        or text.get("hidden_act", "quick_gelu") != "quick_gelu"
    ):
        raise CheckpointError(
            f"{folder}: not an SD 1.x model (text width {text.get('hidden_size')}, "
            f"linear projection {unet.get('use_linear_projection', False)}, head dims "
            f"{heads}); SD 2.x and later are not supported"
        )
    try:
        cfg = SDConfig(
            name=f"diffusers:{folder.name}", unet=_unet_config(unet), vae=_vae_config(vae), clip=_clip_config(text)
        )
    except KeyError as e:
        raise CheckpointError(f"{folder}: a config.json lacks the field {e}") from None
    except (TypeError, IndexError, ZeroDivisionError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{folder}: a config.json mangles a field ({_short(e)})") from None
    try:
        return check_config(cfg)
    except ValueError as e:
        raise CheckpointError(f"{folder}: its config.json files describe no usable model ({_short(e)})") from None


def _short(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def _channels(config: dict, what: str) -> tuple[int, tuple[int, ...]]:
    """`block_out_channels` [320, 640, 1280, 1280] as (320, (1, 2, 4, 4))."""
    channels = config["block_out_channels"]
    if (
        not isinstance(channels, list)
        or not channels
        or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)
        or any(c % channels[0] for c in channels)
    ):
        raise ValueError(f"{what} block_out_channels {channels!r}: positive multiples of the first")
    return channels[0], tuple(c // channels[0] for c in channels)


def _unet_config(unet: dict) -> UNetConfig:
    channels, mult = _channels(unet, "unet")
    return UNetConfig(
        in_channels=unet["in_channels"],
        out_channels=unet["out_channels"],
        model_channels=channels,
        channel_mult=mult,
        num_res_blocks=unet["layers_per_block"],
        attention_levels=tuple(t.startswith("CrossAttn") for t in unet["down_block_types"]),
        num_heads=unet.get("attention_head_dim", 8),
        context_dim=unet["cross_attention_dim"],
        norm_groups=unet["norm_num_groups"],
    )


def _vae_config(vae: dict) -> VAEConfig:
    channels, mult = _channels(vae, "vae")
    return VAEConfig(
        ch=channels,
        ch_mult=mult,
        num_res_blocks=vae["layers_per_block"],
        z_channels=vae["latent_channels"],
        image_channels=vae["in_channels"],
        norm_groups=vae["norm_num_groups"],
        scale_factor=vae.get("scaling_factor", 0.18215),
    )


def _clip_config(text: dict) -> CLIPConfig:
    return CLIPConfig(
        vocab_size=text["vocab_size"],
        width=text["hidden_size"],
        max_positions=text["max_position_embeddings"],
        layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        mlp=text["intermediate_size"],
    )


def diffusers_view(files: dict[str, WeightsFile], keys: Iterable[str], cfg: SDConfig) -> dict[str, TensorRef]:
    """LDM-keyed refs into diffusers component files; keys the folder lacks are simply absent."""
    view = {}
    for key in keys:
        component, name = diffusers_key(key, cfg)
        if component not in files:
            continue
        ref = _lookup(files[component].tensors, component, name)
        if ref is None:
            continue
        if component == "vae" and is_vae_attn_matrix(key[len(VAE_PREFIX) :]) and len(ref.shape) == 2:
            ref = TensorRef((*ref.shape, 1, 1), partial(_as_conv1x1, ref.load))
        view[key] = ref
    return view


def _lookup(tensors: dict[str, TensorRef], component: str, name: str) -> TensorRef | None:
    """A diffusers tensor by its current name or the names older saves used: VAE attention before
    diffusers 0.14; CLIP under `text_model.` before transformers 5 (which saves without it)."""
    if name in tensors:
        return tensors[name]
    if component == "vae":
        for new, old in LEGACY_VAE_ATTN.items():
            name = name.replace(f".{new}.", f".{old}.")
    elif component == "text_encoder":
        name = name.removeprefix("text_model.")
    return tensors.get(name)


def _as_conv1x1(load: Callable[[], Any]) -> Any:
    return load()[:, :, None, None]
