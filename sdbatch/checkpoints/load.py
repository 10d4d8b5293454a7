"""Loading a model's weights into our networks (built on the meta device), and saving them.

Single files load by key: our module names are the LDM checkpoint's keys. Diffusers folders load
through the rules in `sdbatch.convert` (see `source.py`). Every tensor is checked against the
config before any is read, so a wrong file fails with one message naming what does not fit.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..convert import PREFIXES
from ..files import write_atomic
from ..models import SDConfig, StableDiffusion, build_model, get_config
from .kinds import VAE_PREFIX, Kind
from .read import SHOW, CheckpointError, TensorRef, first_line
from .source import CONFIG_METADATA_KEY, open_model, vae_view

# Keys outside our three prefixes (EMA copies under model_ema., the noise-schedule buffers the LDM code
# saved, loss weights) are never looked at. Inside them only CLIP's position_ids is skipped: it is
# recomputed, and merged files often hold a corrupted float copy of it.
IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)


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

    `config` defaults to what the model says (our own files carry it) or else sd15 / sd15-inpainting.
    Raises CheckpointError for anything that is not a loadable SD 1.x model.
    """
    source = open_model(path)
    source.require_loadable()
    cfg = _resolve_config(config) if config is not None else source.config()
    view = source.view(_expected_shapes(cfg).keys(), cfg)
    vae_path = Path(vae) if vae is not None else None
    if vae_path is not None:
        vae_view = _vae_view(vae_path, cfg)
        check_tensors(vae_view, cfg, vae_path, only=VAE_PREFIX)
        view = {k: v for k, v in view.items() if not k.startswith(VAE_PREFIX)} | vae_view
    check_tensors(view, cfg, source.path)
    return LoadedModel(_load_view(view, cfg, device, dtype, source.path), source.path, source.kind, vae_path)


def _resolve_config(config: str | SDConfig) -> SDConfig:
    try:
        return get_config(config)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _vae_view(path: Path, cfg: SDConfig) -> dict[str, TensorRef]:
    """VAE weights from a VAE file or folder, or another SD1 checkpoint (`source.vae_view`)."""
    return vae_view(path, _expected_shapes(cfg), cfg)


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
                f"{source}: cannot read tensor {key} ({first_line(e)}); the file may be truncated or corrupted"
            ) from None
        # always a fresh copy: a tensor aliasing the memory map sits at whatever offset the file gave
        # it, and CPU kernels pick different code paths for unaligned data (outputs then differ ~1e-7
        # from the same weights loaded another way), which would break bitwise reproducibility
        state[key] = tensor.to(device=device, dtype=dtype, copy=True)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# saving


def save_checkpoint(model: StableDiffusion, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the single-file LDM layout: .safetensors (with our config in its header) or .ckpt.
    Atomic, so a crash never leaves half a checkpoint behind."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        header = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())} | (metadata or {})
        return write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=header))
    return write_atomic(path, lambda tmp: torch.save({"state_dict": state}, tmp))
