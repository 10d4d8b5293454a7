"""Upscaler files: is this an ESRGAN (RRDBNet) upscaler, in which key layout, and of what size.

The upscalers A1111 users pick for hires fix (ESRGAN 4x, 4x-UltraSharp, NMKD Siax, RealESRGAN_x4plus,
x4plus_anime_6B, x2plus) are all one network, ESRGAN's RRDBNet, saved under three spellings:

- `esrgan`: the original repository's nn.Sequential (`model.0`, `model.1.sub.N.RDB1.conv1.0`, ...,
  `model.1.sub.<nb>` = the trunk conv, then per x2 stage [upsample, conv, lrelu] so the convs sit
  at `model.3`, `model.6` (`model.9` for x8), then `model.<3k+2>` (HR conv) and `model.<3k+4>`);
- `real-esrgan`: BasicSR's names (`conv_first`, `body.N.rdb1.conv1`, `conv_body`, `conv_up1`, ...,
  `conv_hr`, `conv_last`), in `.pth` files wrapped in `params_ema` / `params`;
- `basicsr-old`: the same module under older BasicSR names (`RRDB_trunk.N.RDB1`, `trunk_conv`,
  `upconv1`, `HRconv`), e.g. BSRGAN / RealSR.

Our module (`esrgan.RRDBNet`) uses the `real-esrgan` names, so the other two are renamed by the rules
below, not by a table per model. Everything is read from the header (nf, nb, gc, stages, in/out
channels, Real-ESRGAN's pixel-unshuffle for x2/x1) and checked against the shapes our module would
have, so a job can refuse a wrong file before anything is loaded: this module never imports torch.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..checkpoints import read as _read
from ..checkpoints.kinds import detect_kind
from ..checkpoints.read import SHOW, CheckpointError, TensorRef, WeightsFile, read_weights

LAYOUTS = ("esrgan", "real-esrgan", "basicsr-old")
# dicts Real-ESRGAN / BasicSR training wraps the weights in (EMA weights first, as Real-ESRGAN loads them)
WRAPPERS = ("params_ema", "params", "state_dict")


class UpscalerError(CheckpointError):
    """A file that is no usable ESRGAN upscaler; the message names the file and what is wrong."""


@dataclass(frozen=True)
class UpscalerInfo:
    """What an upscaler file holds, read from its header. `in_nc` is what the first conv reads: the
    image's channels times `unshuffle`² (Real-ESRGAN x2plus folds each 2x2 block into 12 channels)."""

    path: Path
    layout: str  # one of LAYOUTS
    scale: int  # output side / input side: 1, 2, 4 or 8
    nf: int  # feature channels
    nb: int  # RRDB blocks
    gc: int  # growth channels of each dense block
    in_nc: int
    out_nc: int
    unshuffle: int  # 1, 2 or 4
    tensors: Mapping[str, TensorRef] = field(repr=False, compare=False, default_factory=dict)  # by our key
    names: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)  # our key -> file's

    @property
    def upsamples(self) -> int:
        """x2 nearest-upsampling stages: scale x unshuffle = 2 ** upsamples."""
        return (self.scale * self.unshuffle).bit_length() - 1


def expected_shapes(
    nf: int, nb: int, gc: int, upsamples: int, in_nc: int = 3, out_nc: int = 3
) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of our RRDBNet with these sizes (what a file must match exactly)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int) -> None:
        shapes[f"{name}.weight"] = (cout, cin, 3, 3)
        shapes[f"{name}.bias"] = (cout,)

    conv("conv_first", in_nc, nf)
    for n in range(nb):
        for r in (1, 2, 3):
            for c in (1, 2, 3, 4):
                conv(f"body.{n}.rdb{r}.conv{c}", nf + (c - 1) * gc, gc)
            conv(f"body.{n}.rdb{r}.conv5", nf + 4 * gc, nf)
    conv("conv_body", nf, nf)
    for u in range(1, upsamples + 1):
        conv(f"conv_up{u}", nf, nf)
    conv("conv_hr", nf, nf)
    conv("conv_last", nf, out_nc)
    return shapes


def read_upscaler(path: str | Path) -> UpscalerInfo:
    """The layout and sizes of an ESRGAN upscaler file, checked key by key and shape by shape against
    the module they describe, or UpscalerError saying what the file is instead. Headers only."""
    path = Path(path)
    weights = _open(path)
    shapes = {k.removeprefix("module."): s for k, s in weights.shapes().items()}  # DataParallel saves
    refs = {k.removeprefix("module."): ref for k, ref in weights.tensors.items()}
    layout = _layout(shapes)
    if layout is None:
        raise UpscalerError(f"{path}: not an ESRGAN (RRDBNet) upscaler: it looks like {_describe(shapes)}")
    ours, names = _rename_all(path, layout, shapes)
    conv1 = next((k for k in ours if re.fullmatch(r"body\.\d+\.rdb\d\.conv1\.weight", k)), "body.0.rdb1.conv1.weight")
    for key in ("conv_first.weight", "conv_last.weight", conv1):  # the layers that give the sizes
        if len(ours.get(key, ())) != 4:
            what = "missing" if key not in ours else f"of shape {list(ours[key])}, not a conv"
            spelled = _spell(key, layout, ours) if key not in ours else names[key]
            raise UpscalerError(f"{path}: an incomplete upscaler in {_NAMES[layout]} layout: {spelled} {what}")
    (nf, in_nc), out_nc, gc = ours["conv_first.weight"][:2], ours["conv_last.weight"][0], ours[conv1][0]
    nb = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("body."))
    upsamples = max((int(m[1]) for k in ours if (m := re.fullmatch(r"conv_up(\d+)\.(weight|bias)", k))), default=0)
    unshuffle = next((f for f in (1, 2, 4) if in_nc == out_nc * f * f), 0)
    if not unshuffle or out_nc != 3:
        raise UpscalerError(
            f"{path}: reads {in_nc} and writes {out_nc} channels; sdbatch upscales RGB images (3 channels in and "
            "out, or 12 / 48 in for Real-ESRGAN's x2 / x1 models)"
        )
    if 2**upsamples < unshuffle or upsamples > 3:
        raise UpscalerError(
            f"{path}: {upsamples} upsampling stages with a pixel-unshuffle by {unshuffle}: no ESRGAN scale 1/2/4/8"
        )
    _check_shapes(path, layout, ours, names, expected_shapes(nf, nb, gc, upsamples, in_nc, out_nc))
    tensors = {k: refs[names[k]] for k in ours}
    return UpscalerInfo(path, layout, 2**upsamples // unshuffle, nf, nb, gc, in_nc, out_nc, unshuffle, tensors, names)


# ----------------------------------------------------------------------------------------------------
# opening the file


def _open(path: Path) -> WeightsFile:
    """`read_weights`, plus the Real-ESRGAN `.pth` files whose tensors sit one dict down (`params_ema`),
    which it does not unwrap; every error becomes an UpscalerError with the reader's message."""
    try:
        return read_weights(path)
    except CheckpointError as error:
        nested = _nested(path)
        if nested is None:
            raise UpscalerError(str(error)) from None
        return nested


def _nested(path: Path) -> WeightsFile | None:
    """The tensors under a WRAPPERS key of a pickle, scanned by the same restricted unpickler that
    `read_weights` uses (no code runs); None when the file is anything else."""
    with path.open("rb") as f:
        head = f.read(4)
    zip_format = head.startswith(b"PK\x03\x04")
    if not zip_format and head[:1] != b"\x80":
        return None
    try:
        obj = _read._scan_zip(path) if zip_format else _read._scan_legacy(path)
    except Exception:  # refused or damaged: read_weights' own message says which
        return None
    if not isinstance(obj, dict):
        return None
    inner = next((obj[w] for w in WRAPPERS if isinstance(obj.get(w), dict)), None)
    if inner is None:
        return None
    wrapper = next(w for w in WRAPPERS if obj.get(w) is inner)
    shapes = {k: v.shape for k, v in inner.items() if isinstance(k, str) and isinstance(v, _read._Tensor)}
    if not shapes:
        return None
    opened: list[dict] = []  # the whole file through torch.load(weights_only=True), on the first tensor read

    def load(key: str) -> Any:
        if not opened:
            opened.append(_read._torch_load(path, zip_format))
        return opened[0][wrapper][key]

    return WeightsFile(path, {k: TensorRef(s, partial(load, k)) for k, s in shapes.items()}, {})


# ----------------------------------------------------------------------------------------------------
# layouts and the rules renaming them to ours


_DENSE_BLOCKS = {  # how each layout names its dense blocks: what tells the layouts apart
    "esrgan": re.compile(r"model\.1\.sub\.\d+\.RDB\d\."),
    "real-esrgan": re.compile(r"body\.\d+\.rdb\d\."),
    "basicsr-old": re.compile(r"RRDB_trunk\.\d+\.RDB\d\."),
}
_NAMES = {"esrgan": "ESRGAN", "real-esrgan": "Real-ESRGAN", "basicsr-old": "old BasicSR"}


def _layout(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    return next((name for name, p in _DENSE_BLOCKS.items() if any(p.match(k) for k in shapes)), None)


_OLD_BASICSR = [
    (re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)"), r"body.\1.rdb\2.conv\3.\4"),
    (re.compile(r"trunk_conv\.(weight|bias)"), r"conv_body.\1"),
    (re.compile(r"upconv(\d)\.(weight|bias)"), r"conv_up\1.\2"),
    (re.compile(r"HRconv\.(weight|bias)"), r"conv_hr.\1"),
    (re.compile(r"(conv_first|conv_last)\.(weight|bias)"), r"\1.\2"),
]


def _esrgan_rules(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[re.Pattern, Any]]:
    """The `model.N` rules depend on the file: the trunk conv is `model.1.sub.<nb>`, and the last
    two convs sit after k upsampling stages of three layers each (`model.<3k+2>`, `model.<3k+4>`)."""
    subs = [int(m[1]) for k in shapes if (m := re.fullmatch(r"model\.1\.sub\.(\d+)\.weight", k))]
    trunk, stages = max(subs, default=-1), _esrgan_stages(shapes)

    def top(m: re.Match) -> str | None:
        index, kind = int(m[1]), m[2]
        if index == 0:
            return f"conv_first.{kind}"
        if stages >= 0 and index == 3 * stages + 2:
            return f"conv_hr.{kind}"
        if stages >= 0 and index == 3 * stages + 4:
            return f"conv_last.{kind}"
        if stages >= 0 and index % 3 == 0 and 1 <= index // 3 <= stages:
            return f"conv_up{index // 3}.{kind}"
        return None

    return [
        (re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)"), r"body.\1.rdb\2.conv\3.\4"),
        (re.compile(rf"model\.1\.sub\.{trunk}\.(weight|bias)"), lambda m: f"conv_body.{m[1]}"),
        (re.compile(r"model\.(\d+)\.(weight|bias)"), top),
    ]  # fmt: skip


def _esrgan_stages(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """k, from the last conv's index 3k + 4; -1 when the last top-level index is no such number."""
    end = max((int(m[1]) for k in shapes if (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k))), default=-1)
    return (end - 4) // 3 if end >= 4 and (end - 4) % 3 == 0 else -1


def _rules(layout: str, shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[re.Pattern, Any]]:
    if layout == "esrgan":
        return _esrgan_rules(shapes)
    if layout == "basicsr-old":
        return _OLD_BASICSR
    return [(re.compile(r".*"), r"\g<0>")]


def _rename(key: str, rules: list[tuple[re.Pattern, Any]]) -> str | None:
    """Our name for a file's key, or None when no rule of its layout names it."""
    for pattern, target in rules:
        m = pattern.fullmatch(key)
        name = None if m is None else target(m) if callable(target) else m.expand(target)
        if name is not None:
            return name
    return None


def _rename_all(
    path: Path, layout: str, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The file's shapes by our keys, and our key -> the file's key (to load it, and to name it)."""
    if layout == "esrgan" and any(".conv1x1." in k for k in shapes):
        raise UpscalerError(f"{path}: an ESRGAN+ model (conv1x1 in its dense blocks); sdbatch runs plain ESRGAN")
    if layout == "esrgan" and _esrgan_stages(shapes) < 0:
        tops = sorted({int(m[1]) for k in shapes if (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k))})
        raise UpscalerError(
            f"{path}: its top-level layers ({', '.join(f'model.{i}' for i in tops)}) do not end as ESRGAN's do "
            "(model.3, model.6, ... for the x2 stages, then model.<3k+2> and model.<3k+4>)"
        )
    rules = _rules(layout, shapes)
    ours: dict[str, tuple[int, ...]] = {}
    names: dict[str, str] = {}
    unknown: list[str] = []
    for key, shape in shapes.items():
        name = _rename(key, rules)
        if name is None:
            unknown.append(key)
        elif name in ours:
            raise UpscalerError(f"{path}: {names[name]} and {key} are the same layer")
        else:
            ours[name], names[name] = shape, key
    if unknown:
        shown = ", ".join(unknown[:SHOW]) + (", ..." if len(unknown) > SHOW else "")
        raise UpscalerError(f"{path}: has keys that are no part of an RRDBNet in {_NAMES[layout]} layout ({shown})")
    return ours, names


def _spell(name: str, layout: str, ours: Mapping[str, tuple[int, ...]]) -> str:
    """A key of ours as the file's layout would spell it: to name a layer the file lacks."""
    if layout == "real-esrgan":
        return name
    if layout == "basicsr-old":
        for old, new in (("body.", "RRDB_trunk."), ("conv_body.", "trunk_conv."), ("conv_up", "upconv"),
                         ("conv_hr.", "HRconv.")):  # fmt: skip
            if name.startswith(old):
                name = new + name[len(old) :]
        return re.sub(r"\.rdb(\d)\.", r".RDB\1.", name)
    nb = 1 + max((int(k.split(".")[1]) for k in ours if k.startswith("body.")), default=-1)
    stages = sum(1 for k in ours if re.fullmatch(r"conv_up\d+\.weight", k))
    stem, kind = name.rsplit(".", 1)
    if stem.startswith("body."):
        n, rdb, conv = stem.split(".")[1:]
        return f"model.1.sub.{n}.RDB{rdb[3:]}.{conv}.0.{kind}"
    if stem.startswith("conv_up"):
        return f"model.{3 * int(stem[7:])}.{kind}"
    index = {"conv_first": "0", "conv_body": f"1.sub.{nb}", "conv_hr": str(3 * stages + 2)}
    return f"model.{index.get(stem, str(3 * stages + 4))}.{kind}"


def _check_shapes(
    path: Path,
    layout: str,
    ours: Mapping[str, tuple[int, ...]],
    names: Mapping[str, str],
    expected: Mapping[str, tuple[int, ...]],
) -> None:
    missing = [k for k in expected if k not in ours]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        first = _spell(missing[0], layout, ours)
        raise UpscalerError(f"{path}: an incomplete upscaler in {_NAMES[layout]} layout: {first}{more} missing")
    extra = [k for k in ours if k not in expected]
    if extra:
        shown = ", ".join(names[k] for k in extra[:SHOW])
        raise UpscalerError(f"{path}: has layers an RRDBNet of its size does not ({shown})")
    for key, shape in expected.items():
        if tuple(ours[key]) != shape:
            raise UpscalerError(
                f"{path}: {names[key]} has shape {list(ours[key])}, expected {list(shape)} "
                "(an RRDBNet whose layers do not fit together)"
            )


# ----------------------------------------------------------------------------------------------------
# what a file is instead

# (a key prefix or name another upscaler architecture has, what to call it); tried in order
_OTHERS = [
    ("layers.0.residual_group.", "SwinIR or HAT (layers.0.residual_group...)"),
    ("m_head.", "SCUNet (m_head...)"),
    ("conv_1.sk.", "SPAN (conv_1.sk...)"),
    ("body.0.weight", "Real-ESRGAN Compact / SRVGGNet (body.0.weight, body.1.weight, ...)"),
]


def _describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    for prefix, name in _OTHERS:
        if any(k.startswith(prefix) for k in shapes):
            return f"{name}, another upscaler architecture"
    kind = detect_kind(dict(shapes))
    if kind.name != "unknown":
        return kind.description
    examples = ", ".join(list(shapes)[:3])
    return f"something else ({len(shapes)} tensors, e.g. {examples})"
