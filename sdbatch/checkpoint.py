"""Weights on disk: what a file is, loading it safely into our model, saving, and its hash.

Single files (.safetensors memory-mapped; .ckpt/.pt/.pth/.bin only through `torch.load(weights_only=True)`)
load by key: our module names are the LDM checkpoint's keys. Diffusers folders load through the rules
in `sdbatch.convert`. Nothing here ever executes pickled code or touches the network.
"""

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .convert import LEGACY_VAE_ATTN, PREFIXES, diffusers_key, is_vae_attn_matrix
from .errors import InputError
from .models import CONFIGS, CLIPConfig, SDConfig, StableDiffusion, UNetConfig, VAEConfig, build_model, get_config

VAE_PREFIX = PREFIXES["vae"]
CONFIG_METADATA_KEY = "sdbatch.config"  # our SDConfig as JSON, in the safetensors header of files we write
# Keys outside our three prefixes (EMA copies under model_ema., the noise-schedule buffers the LDM code
# saved, loss weights) are never looked at. Inside them only CLIP's position_ids is skipped: it is
# recomputed, and merged files often hold a corrupted float copy of it.
IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
SHOW = 5  # how many offending keys an error message lists


class CheckpointError(InputError):
    """A weights file or folder that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor not read yet: its shape is known from the header, its data is read on `load()`."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


@dataclass
class WeightsFile:
    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: ref.shape for k, ref in self.tensors.items()}


# ----------------------------------------------------------------------------------------------------
# reading one file


def read_weights(path: str | Path) -> WeightsFile:
    """Open a weights file lazily, or raise CheckpointError saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a weights file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); was the download interrupted?")
    with path.open("rb") as f:
        head = f.read(256)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return _read_torch(path, zip_format=head.startswith(b"PK"))
    if len(head) >= 9 and head[8:9] == b"{":
        return _read_safetensors(path, head, size)
    raise CheckpointError(f"{path}: not a weights file ({_describe_unknown(head)})")


def _describe_unknown(head: bytes) -> str:
    text = head.decode("utf-8", errors="replace")
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the weights: run `git lfs pull` in its repository"
    if "<html" in text.lower() or "<!doctype" in text.lower():
        return "an HTML page, probably a failed or login-walled download"
    if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
        return f"a text file starting with {text[:40]!r}"
    return f"unknown format, first bytes {head[:8].hex(' ')}"


def _read_safetensors(path: Path, head: bytes, size: int) -> WeightsFile:
    header_len = int.from_bytes(head[:8], "little")
    if 8 + header_len > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (its header alone needs {8 + header_len} bytes, "
            f"the file has {size}); download it again"
        )
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")  # memory-mapped; reads tensors on demand
        names = handle.keys()  # safe_open is not a mapping: `in handle` does not work
        tensors = {k: TensorRef(tuple(handle.get_slice(k).get_shape()), partial(handle.get_tensor, k)) for k in names}
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: corrupted or truncated safetensors file ({_first_line(e)}); download it again"
        ) from None
    return WeightsFile(path, tensors, metadata)


def _read_torch(path: Path, zip_format: bool) -> WeightsFile:
    try:
        # mmap keeps a multi-GB zip checkpoint out of RAM until each tensor is used (zip format only)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds Python objects other than tensors "
            f"({_unsupported_global(e)}). sdbatch never runs code from a checkpoint; convert the file to "
            ".safetensors with a tool you trust, or use a .safetensors release"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: truncated or corrupted checkpoint ({_first_line(e)}); download it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / LDM training checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {
        k: TensorRef(tuple(v.shape), partial(_identity, v))
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    }
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(obj)[:SHOW]))})")
    return WeightsFile(path, tensors, {})


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def _unsupported_global(error: BaseException) -> str:
    for line in str(error).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()[:200]
    return _first_line(error)


# ----------------------------------------------------------------------------------------------------
# what a set of keys is


@dataclass(frozen=True)
class Kind:
    name: str  # sd1, sd1-inpainting, sd1-vae, sd2, sdxl, ...
    description: str

    @property
    def loadable(self) -> bool:
        return self.name in ("sd1", "sd1-inpainting")


def detect_kind(shapes: dict[str, tuple[int, ...]]) -> Kind:
    """Tell SD1 / SD1-inpainting / SD2 / SDXL / other files apart by their key names and shapes."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    first_conv = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    to_k = shapes.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if has("conditioner.embedders."):
        return Kind("sdxl", "an SDXL checkpoint (two text encoders under conditioner.embedders.*)")
    if has("cond_stage_model.model.") or (to_k is not None and to_k[1] == 1024):
        return Kind("sd2", "an SD 2.x checkpoint (OpenCLIP ViT-H text encoder, 1024-wide context)")
    if first_conv is not None:
        channels = first_conv[1]
        if channels == 4:
            return Kind("sd1", "an SD 1.x checkpoint")
        if channels == 9:
            return Kind("sd1-inpainting", "an SD 1.x inpainting checkpoint (9-channel UNet)")
        if channels == 8:
            return Kind("sd1-pix2pix", "an InstructPix2Pix checkpoint (8-channel UNet)")
        return Kind("unet-other", f"a UNet with {channels} input channels, not SD 1.x")
    if has("model.diffusion_model."):
        example = next(k for k in keys if k.startswith("model.diffusion_model."))
        return Kind("diffusion-other", f"a diffusion model that is not SD 1.x (e.g. key {example})")
    if has("lora_unet_") or has("lora_te") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        return Kind("lora", "a LoRA (low-rank add-on weights), not a full model")
    if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
        diffusers = has("encoder.down_blocks.")
        return Kind(
            "vae-diffusers" if diffusers else "sd1-vae",
            "a VAE in diffusers layout" if diffusers else "a VAE (first_stage_model weights)",
        )
    if has(VAE_PREFIX) and not has("cond_stage_model."):
        return Kind("sd1-vae", "a VAE (first_stage_model weights)")
    if "conv_in.weight" in keys and has("down_blocks."):
        return Kind("diffusers-unet", "a diffusers UNet weights file; pass the whole diffusers folder instead")
    if has("text_model."):
        return Kind("text-encoder", "a CLIP text encoder alone")
    examples = ", ".join(list(keys)[:3])
    return Kind("unknown", f"not a Stable Diffusion checkpoint ({len(shapes)} tensors, e.g. {examples})")


# ----------------------------------------------------------------------------------------------------
# diffusers folders


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


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


def _component_file(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing (no such folder)"
    raise CheckpointError(f"{folder}: no weights file ({' / '.join(_WEIGHT_NAMES[:2])}, ...); found {found}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (every diffusers component folder has a config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


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
        channels = unet["block_out_channels"]
        vae_channels = vae["block_out_channels"]
        return SDConfig(
            name=f"diffusers:{folder.name}",
            unet=UNetConfig(
                in_channels=unet["in_channels"],
                out_channels=unet["out_channels"],
                model_channels=channels[0],
                channel_mult=tuple(c // channels[0] for c in channels),
                num_res_blocks=unet["layers_per_block"],
                attention_levels=tuple(t.startswith("CrossAttn") for t in unet["down_block_types"]),
                num_heads=heads,
                context_dim=unet["cross_attention_dim"],
                norm_groups=unet["norm_num_groups"],
            ),
            vae=VAEConfig(
                ch=vae_channels[0],
                ch_mult=tuple(c // vae_channels[0] for c in vae_channels),
                num_res_blocks=vae["layers_per_block"],
                z_channels=vae["latent_channels"],
                image_channels=vae["in_channels"],
                norm_groups=vae["norm_num_groups"],
                scale_factor=vae.get("scaling_factor", 0.18215),
            ),
            clip=CLIPConfig(
                vocab_size=text["vocab_size"],
                width=text["hidden_size"],
                max_positions=text["max_position_embeddings"],
                layers=text["num_hidden_layers"],
                heads=text["num_attention_heads"],
                mlp=text["intermediate_size"],
            ),
        )
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{folder}: a config.json lacks or mangles a field ({e!r})") from None


def _diffusers_view(files: dict[str, WeightsFile], keys: Iterable[str], cfg: SDConfig) -> dict[str, TensorRef]:
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


def _as_conv1x1(load: Callable[[], torch.Tensor]) -> torch.Tensor:
    return load()[:, :, None, None]


# ----------------------------------------------------------------------------------------------------
# loading into our model


@dataclass
class LoadedModel:
    model: StableDiffusion
    path: Path
    kind: Kind
    vae_path: Path | None

    @property
    def config(self) -> SDConfig:
        return self.model.config


def load_model(
    path: str | Path,
    *,
    config: str | SDConfig | None = None,
    vae: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load an SD 1.x single-file checkpoint or diffusers folder, optionally with another VAE.

    `config` defaults to what the file says (our own files carry it) or else sd15 / sd15-inpainting.
    Raises CheckpointError for anything that is not a loadable SD 1.x model.
    """
    path = Path(path)
    if is_diffusers_folder(path):
        cfg = config_from_diffusers(path)
        if config is not None:
            cfg = _resolve_config(config)
        files = {c: read_weights(_component_file(path / c)) for c in PREFIXES}
        keys = _expected_shapes(cfg).keys()
        view = _diffusers_view(files, keys, cfg)
        kind = _folder_kind(cfg)
    else:
        if path.is_dir():
            raise CheckpointError(
                f"{path}: a folder but not a diffusers model (no model_index.json or unet/); "
                "pass the .safetensors/.ckpt file itself"
            )
        weights = read_weights(path)
        kind = detect_kind(weights.shapes())
        if not kind.loadable:
            raise CheckpointError(
                f"{path}: {kind.description}; sdbatch loads SD 1.x checkpoints (normal or 9-channel inpainting) only"
            )
        cfg = _resolve_config(config) if config is not None else _config_for_file(weights, kind)
        view = dict(weights.tensors)
    vae_path = Path(vae) if vae is not None else None
    if vae_path is not None:
        vae_view = _vae_view(vae_path, cfg)
        check_tensors(vae_view, cfg, vae_path, only=VAE_PREFIX)
        view = {k: v for k, v in view.items() if not k.startswith(VAE_PREFIX)} | vae_view
    check_tensors(view, cfg, path)
    return LoadedModel(_load_view(view, cfg, device, dtype, path), path, kind, vae_path)


def model_config(path: str | Path) -> SDConfig:
    """The config `load_model` would use for this file or folder, read without loading any tensor."""
    path = Path(path)
    if is_diffusers_folder(path):
        return config_from_diffusers(path)
    weights = read_weights(path)
    kind = detect_kind(weights.shapes())
    if not kind.loadable:
        raise CheckpointError(
            f"{path}: {kind.description}; sdbatch loads SD 1.x checkpoints (normal or 9-channel inpainting) only"
        )
    return _config_for_file(weights, kind)


DEFAULTS_METADATA_KEY = "sdbatch.defaults"


def model_defaults(path: str | Path) -> dict:
    """Settings the model's maker recommends, from its safetensors header (`sdbatch.defaults`,
    e.g. {"cfg": 4.0}); jobs use them where they set nothing themselves. Empty for other files."""
    path = Path(path)
    if is_diffusers_folder(path) or path.suffix != ".safetensors":
        return {}
    stored = read_weights(path).metadata.get(DEFAULTS_METADATA_KEY)
    try:
        data = json.loads(stored) if stored else {}
    except json.JSONDecodeError:
        return {}
    cfg = data.get("cfg") if isinstance(data, dict) else None
    return {"cfg": float(cfg)} if isinstance(cfg, (int, float)) and 0 <= cfg <= 100 else {}


def _resolve_config(config: str | SDConfig) -> SDConfig:
    try:
        return get_config(config)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _folder_kind(cfg: SDConfig) -> Kind:
    return Kind("sd1-inpainting" if cfg.unet.in_channels == 9 else "sd1", "an SD 1.x diffusers folder")


def _config_for_file(weights: WeightsFile, kind: Kind) -> SDConfig:
    stored = weights.metadata.get(CONFIG_METADATA_KEY)
    if stored is not None:
        try:
            return SDConfig.from_dict(json.loads(stored))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(
                f"{weights.path}: its '{CONFIG_METADATA_KEY}' metadata is unreadable ({e!r})"
            ) from None
    return CONFIGS["sd15-inpainting" if kind.name == "sd1-inpainting" else "sd15"]


def _vae_view(path: Path, cfg: SDConfig) -> dict[str, TensorRef]:
    """VAE weights from a VAE file (LDM keys with or without `first_stage_model.`, or diffusers keys),
    a diffusers VAE folder, a full diffusers folder, or a full SD1 checkpoint."""
    vae_keys = [k for k in _expected_shapes(cfg) if k.startswith(VAE_PREFIX)]
    if path.is_dir():
        folder = path / "vae" if is_diffusers_folder(path) else path
        return _diffusers_view({"vae": read_weights(_component_file(folder))}, vae_keys, cfg)
    weights = read_weights(path)
    kind = detect_kind(weights.shapes())
    if kind.name == "vae-diffusers":
        return _diffusers_view({"vae": weights}, vae_keys, cfg)
    if kind.name in ("sd1-vae", "sd1", "sd1-inpainting"):
        view = {}
        for key, ref in weights.tensors.items():
            if key.startswith(VAE_PREFIX):
                view[key] = ref
            elif key.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
                view[VAE_PREFIX + key] = ref
        return view
    raise CheckpointError(f"{path}: given as a VAE but it is {kind.description}")


_SHAPES_CACHE: dict[SDConfig, dict[str, tuple[int, ...]]] = {}


def _expected_shapes(cfg: SDConfig) -> dict[str, tuple[int, ...]]:
    if cfg not in _SHAPES_CACHE:
        _SHAPES_CACHE[cfg] = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    return _SHAPES_CACHE[cfg]


def _listing(items: list[str], total: int) -> str:
    more = f" (and {total - len(items)} more)" if total > len(items) else ""
    return ", ".join(items) + more


def check_tensors(view: dict[str, TensorRef], cfg: SDConfig, source: Path, only: str = "") -> None:
    """Raise one CheckpointError naming the first missing, unexpected and mis-shaped tensors
    (of the keys starting with `only`)."""
    expected = {k: s for k, s in _expected_shapes(cfg).items() if k.startswith(only)}
    ours = tuple(p for p in PREFIXES.values() if p.startswith(only))
    missing = [k for k in expected if k not in view]
    unexpected = [k for k in view if k.startswith(ours) and k not in expected and k not in IGNORED_KEYS]
    misshaped = [
        f"{k} {list(view[k].shape)} (model wants {list(s)})"
        for k, s in expected.items()
        if k in view and view[k].shape != s
    ]
    problems = []
    if missing:
        hint = ""
        if all(k.startswith(VAE_PREFIX) for k in missing):
            hint = "; the file has no VAE: give one with `vae:`"
        problems.append(f"{len(missing)} missing: {_listing(missing[:SHOW], len(missing))}{hint}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected[:SHOW], len(unexpected))}")
    if misshaped:
        problems.append(f"{len(misshaped)} with the wrong shape: {_listing(misshaped[:SHOW], len(misshaped))}")
    if problems:
        raise CheckpointError(f"{source}: does not fit model config '{cfg.name}': " + "; ".join(problems))


def _load_view(
    view: dict[str, TensorRef], cfg: SDConfig, device: str | torch.device, dtype: torch.dtype, source: Path
) -> StableDiffusion:
    """Read every tensor (already checked by `check_tensors`) into a model built on the meta device."""
    model = build_model(cfg, device="meta")
    state = {}
    for key in _expected_shapes(cfg):
        try:
            tensor = view[key].load()
        except (SafetensorError, RuntimeError, OSError) as e:
            raise CheckpointError(
                f"{source}: cannot read tensor {key} ({_first_line(e)}); the file may be truncated or corrupted"
            ) from None
        # always a fresh copy: a tensor aliasing the memory map sits at whatever offset the file gave
        # it, and CPU kernels pick different code paths for unaligned data (outputs then differ ~1e-7
        # from the same weights loaded another way), which would break bitwise reproducibility
        state[key] = tensor.to(device=device, dtype=dtype, copy=True)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def weights_dir() -> Path:
    """Where users drop weights: $SDBATCH_WEIGHTS, default ./weights."""
    return Path(os.environ.get("SDBATCH_WEIGHTS", "weights"))


SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"  # the checkout's weights/ (demo/)


def resolve_model(model: str | Path) -> Path:
    """A path as given, or a name looked up in the weights folder, then in the checkout's weights/
    (which holds the shipped `demo`). A folder holding `model.safetensors` stands for that file."""
    path = Path(model)
    if path.exists():
        return _model_file(path)
    looked = []
    for base in dict.fromkeys((weights_dir(), SHIPPED_WEIGHTS)):
        for candidate in (base / path, base / f"{model}.safetensors", base / f"{model}.ckpt"):
            looked.append(str(candidate))
            if candidate.exists():
                return _model_file(candidate)
    raise CheckpointError(f"model {str(model)!r} not found; looked for {', '.join(looked[:4])}")


def _model_file(path: Path) -> Path:
    if path.is_dir() and not is_diffusers_folder(path) and (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    return path


# ----------------------------------------------------------------------------------------------------
# saving


def save_checkpoint(model: StableDiffusion, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the single-file LDM layout: .safetensors (with our config in its header) or .ckpt.

    Written to a temp file and renamed, so a crash never leaves half a checkpoint behind."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            header = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())} | (metadata or {})
            save_file(state, tmp, metadata=header)
        else:
            torch.save({"state_dict": state}, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a weights file is as readable as any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------------------------------------------
# hashing


def cache_dir() -> Path:
    """$SDBATCH_CACHE, else $XDG_CACHE_HOME/sdbatch, else ~/.cache/sdbatch."""
    if os.environ.get("SDBATCH_CACHE"):
        return Path(os.environ["SDBATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdbatch"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached by (real path, size, mtime) since a 4 GB file takes seconds to hash."""
    path = Path(path).resolve()
    stat = path.stat()
    entry = cache_dir() / "hashes" / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(entry.read_text())
        if all(cached.get(k) == v for k, v in stamp.items()) and len(cached.get("sha256", "")) == 64:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    sha = digest.hexdigest()
    try:  # best effort: an unwritable cache only costs the next run the same few seconds
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(stamp | {"sha256": sha}, f)
        os.replace(tmp, entry)
    except OSError:
        pass
    return sha


def model_sha256(path: str | Path) -> str:
    """A file's sha256; for a diffusers folder, the sha256 of its component files' sha256s in order."""
    path = Path(path)
    if is_diffusers_folder(path):
        parts = [f"{c}/{_component_file(path / c).name}:{file_sha256(_component_file(path / c))}" for c in PREFIXES]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return file_sha256(path)


def model_hash(path: str | Path) -> str:
    """The short 'Model hash' A1111 writes into PNG parameters: the first 10 hex digits of the sha256."""
    return model_sha256(path)[:10]


def describe(path: str | Path) -> tuple[Kind, dict[str, tuple[int, ...]], dict[str, str]]:
    """Kind, shapes and metadata of a file or diffusers folder without loading any tensor data."""
    path = Path(path)
    if is_diffusers_folder(path):
        kind = _folder_kind(config_from_diffusers(path))
        shapes: dict[str, tuple[int, ...]] = {}
        for component in PREFIXES:
            shapes |= {
                f"{component}/{k}": s for k, s in read_weights(_component_file(path / component)).shapes().items()
            }
        return kind, shapes, {}
    weights = read_weights(path)
    return detect_kind(weights.shapes()), weights.shapes(), weights.metadata


__all__ = [
    "CheckpointError",
    "Kind",
    "LoadedModel",
    "TensorRef",
    "WeightsFile",
    "check_tensors",
    "config_from_diffusers",
    "describe",
    "detect_kind",
    "file_sha256",
    "is_diffusers_folder",
    "load_model",
    "model_config",
    "model_hash",
    "model_sha256",
    "read_weights",
    "save_checkpoint",
]
