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
from ..models.configs import CONFIGS, CLIPConfig, SDConfig, UNetConfig, VAEConfig
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
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{self.path}: its '{CONFIG_METADATA_KEY}' metadata is unreadable ({e!r})") from None

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
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (every diffusers component folder has a config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a config (a JSON object); it holds {type(data).__name__}")
    return data


def config_from_diffusers(folder: Path) -> SDConfig:
    """Our SDConfig from a diffusers pipeline folder's unet/vae/text_encoder config.json files."""
    if (folder / "text_encoder_2").is_dir():
        raise CheckpointError(
            f"{folder}: this is an SDXL diffusers folder (it has text_encoder_2/); sdbatch supports SD 1.x only"
        )
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
        return SDConfig(
            name=f"diffusers:{folder.name}", unet=_unet_config(unet), vae=_vae_config(vae), clip=_clip_config(text)
        )
    except (KeyError, TypeError, IndexError, ZeroDivisionError, AttributeError) as e:
        raise CheckpointError(f"{folder}: a config.json lacks or mangles a field ({e!r})") from None


def _unet_config(unet: dict) -> UNetConfig:
    channels = unet["block_out_channels"]
    return UNetConfig(
        in_channels=unet["in_channels"],
        out_channels=unet["out_channels"],
        model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=unet["layers_per_block"],
        attention_levels=tuple(t.startswith("CrossAttn") for t in unet["down_block_types"]),
        num_heads=unet.get("attention_head_dim", 8),
        context_dim=unet["cross_attention_dim"],
        norm_groups=unet["norm_num_groups"],
    )


def _vae_config(vae: dict) -> VAEConfig:
    channels = vae["block_out_channels"]
    return VAEConfig(
        ch=channels[0],
        ch_mult=tuple(c // channels[0] for c in channels),
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
