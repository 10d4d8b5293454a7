"""ESRGAN / Real-ESRGAN upscalers (RRDBNet): every key layout loads and runs the published block maths
(written out here with torch.nn.functional on the file's own tensors, apart from sdbatch's module),
tiling matches the untiled run, A1111's hires-fix resize rule, and the refusals."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from sdbatch.errors import InputError
from sdbatch.upscale import (
    RRDBNet,
    UpscalerError,
    expected_shapes,
    load_upscaler,
    read_upscaler,
    upscale_image,
    upscale_tensor,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs" / "upscalers" / "tiny-rrdb-x2.safetensors"
NF, NB, GC = 8, 2, 4


# ----------------------------------------------------------------------------------------------------
# files in each layout, and the maths they stand for, written independently of sdbatch


def real_esrgan_state(nb: int = NB, upsamples: int = 2, in_nc: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under BasicSR / Real-ESRGAN names (fan-in scaled, so activations stay O(1))."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name: str, cin: int, cout: int) -> None:
        state[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.05

    conv("conv_first", in_nc, NF)
    for n in range(nb):
        for r in (1, 2, 3):
            for c in (1, 2, 3, 4):
                conv(f"body.{n}.rdb{r}.conv{c}", NF + (c - 1) * GC, GC)
            conv(f"body.{n}.rdb{r}.conv5", NF + 4 * GC, NF)
    conv("conv_body", NF, NF)
    for u in range(1, upsamples + 1):
        conv(f"conv_up{u}", NF, NF)
    conv("conv_hr", NF, NF)
    conv("conv_last", NF, 3)
    return state


def to_esrgan(state: dict[str, torch.Tensor], nb: int, upsamples: int) -> dict[str, torch.Tensor]:
    """The original ESRGAN nn.Sequential names: model.0, model.1.sub.N.RDBk.convj.0, model.1.sub.<nb>,
    then [upsample, conv, lrelu] per x2 stage (convs at 3, 6, 9), HR conv at 3k+2, last conv at 3k+4."""
    out = {}
    for key, tensor in state.items():
        stem, kind = key.rsplit(".", 1)
        if stem.startswith("body."):
            _, n, rdb, conv = stem.split(".")
            name = f"model.1.sub.{n}.RDB{rdb[-1]}.{conv}.0"
        elif stem.startswith("conv_up"):
            name = f"model.{3 * int(stem[-1])}"
        else:
            index = {"conv_first": "0", "conv_body": f"1.sub.{nb}", "conv_hr": str(3 * upsamples + 2)}
            name = "model." + index.get(stem, str(3 * upsamples + 4))
        out[f"{name}.{kind}"] = tensor
    return out


def to_basicsr_old(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    table = {"conv_body.": "trunk_conv.", "conv_up1.": "upconv1.", "conv_up2.": "upconv2.", "conv_hr.": "HRconv."}
    out = {}
    for key, tensor in state.items():
        if key.startswith("body."):
            _, n, rdb, conv, kind = key.split(".")
            key = f"RRDB_trunk.{n}.RDB{rdb[-1]}.{conv}.{kind}"
        for old, new in table.items():
            key = key.replace(old, new) if key.startswith(old) else key
        out[key] = tensor
    return out


def reference(state: dict[str, torch.Tensor], x: torch.Tensor, nb: int, upsamples: int, unshuffle: int) -> torch.Tensor:
    """BasicSR's RRDBNet.forward on the raw tensors (sides divisible by `unshuffle`)."""

    def conv(name: str, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)

    def lrelu(t: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(t, negative_slope=0.2)

    if unshuffle > 1:
        x = F.pixel_unshuffle(x, unshuffle)
    feat = conv("conv_first", x)
    trunk = feat
    for n in range(nb):
        rrdb_in = trunk
        for r in (1, 2, 3):
            p = f"body.{n}.rdb{r}."
            x0 = trunk
            x1 = lrelu(conv(p + "conv1", x0))
            x2 = lrelu(conv(p + "conv2", torch.cat((x0, x1), 1)))
            x3 = lrelu(conv(p + "conv3", torch.cat((x0, x1, x2), 1)))
            x4 = lrelu(conv(p + "conv4", torch.cat((x0, x1, x2, x3), 1)))
            x5 = conv(p + "conv5", torch.cat((x0, x1, x2, x3, x4), 1))
            trunk = x5 * 0.2 + x0
        trunk = trunk * 0.2 + rrdb_in
    feat = feat + conv("conv_body", trunk)
    for u in range(1, upsamples + 1):
        feat = lrelu(conv(f"conv_up{u}", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


def write(path: Path, tensors: dict, wrapper: str | None = None) -> Path:
    if path.suffix == ".safetensors":
        assert wrapper is None
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    else:
        torch.save({wrapper: tensors} if wrapper else tensors, path)
    return path


# id: (layout, upsamples, unshuffle, file suffix, wrapper, expected scale)
CASES = {
    "real-esrgan-x4": ("real-esrgan", 2, 1, ".safetensors", None, 4),
    "real-esrgan-x2plus-pth": ("real-esrgan", 2, 2, ".pth", "params_ema", 2),
    "real-esrgan-x1": ("real-esrgan", 2, 4, ".safetensors", None, 1),
    "esrgan-x4-pth": ("esrgan", 2, 1, ".pth", None, 4),
    "esrgan-x2": ("esrgan", 1, 1, ".safetensors", None, 2),
    "esrgan-x8": ("esrgan", 3, 1, ".safetensors", None, 8),
    "esrgan-x1": ("esrgan", 0, 1, ".pth", None, 1),
    "basicsr-old-x4-pth": ("basicsr-old", 2, 1, ".pth", "state_dict", 4),
}


@pytest.mark.parametrize("case", CASES)
def test_each_layout_loads_and_runs_the_block_maths(tmp_path, case):
    layout, upsamples, unshuffle, suffix, wrapper, scale = CASES[case]
    state = real_esrgan_state(upsamples=upsamples, in_nc=3 * unshuffle**2)
    renamed = {"esrgan": lambda s: to_esrgan(s, NB, upsamples), "basicsr-old": to_basicsr_old}.get(layout, dict)
    path = write(tmp_path / f"{case}{suffix}", renamed(state), wrapper)

    info = read_upscaler(path)
    assert (info.layout, info.scale, info.unshuffle) == (layout, scale, unshuffle)
    assert (info.nf, info.nb, info.gc, info.in_nc, info.out_nc) == (NF, NB, GC, 3 * unshuffle**2, 3)

    net = load_upscaler(path)
    x = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = net(x)
    expected = reference(state, x, NB, upsamples, unshuffle)
    assert ours.shape == (2, 3, 16 * scale, 12 * scale)
    assert (ours - expected).abs().max() < 1e-5


def test_real_esrgan_pth_prefers_the_ema_weights(tmp_path):
    """Real-ESRGAN's training files hold `params` and `params_ema`; the EMA weights are the release."""
    ema, plain = real_esrgan_state(seed=0), real_esrgan_state(seed=1)
    path = tmp_path / "both.pth"
    torch.save({"params": {f"module.{k}": v for k, v in plain.items()}, "params_ema": ema}, path)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert (load_upscaler(path)(x) - reference(ema, x, NB, 2, 1)).abs().max() < 1e-5


def test_module_prefix_of_data_parallel_is_dropped(tmp_path):
    state = real_esrgan_state()
    path = write(tmp_path / "dp.pth", {f"module.{k}": v for k, v in state.items()}, "params")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert (load_upscaler(path)(x) - reference(state, x, NB, 2, 1)).abs().max() < 1e-5


@pytest.mark.parametrize("unshuffle", [2, 4])
def test_odd_sides_are_padded_by_reflection_and_cropped(tmp_path, unshuffle):
    """Real-ESRGAN pads the bottom and right by reflection to a multiple of the unshuffle factor
    (RealESRGANer.pre_process) and crops the output; any side works."""
    state = real_esrgan_state(in_nc=3 * unshuffle**2)
    net = load_upscaler(write(tmp_path / "x.safetensors", state))
    scale = 4 // unshuffle
    x = torch.rand(1, 3, 9, 7)
    padded = F.pad(x, (0, -7 % unshuffle, 0, -9 % unshuffle), mode="reflect")
    with torch.no_grad():
        ours = net(x)
        assert ours.shape == (1, 3, 9 * scale, 7 * scale)
        expected = reference(state, padded, NB, 2, unshuffle)[..., : 9 * scale, : 7 * scale]
        assert (ours - expected).abs().max() < 1e-5
        assert net(torch.rand(1, 3, 1, 5)).shape == (1, 3, scale, 5 * scale)  # too thin to reflect


@pytest.mark.parametrize("sizes", [(1, 2, 1), (2, 1, 2), (0, 3, 1), (3, 0, 1)])
def test_module_has_the_shapes_the_file_check_expects(sizes):
    nb, upsamples, unshuffle = sizes
    net = RRDBNet(nf=NF, nb=nb, gc=GC, scale=2**upsamples // unshuffle, unshuffle=unshuffle)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == expected_shapes(NF, nb, GC, upsamples, in_nc=3 * unshuffle**2)


# ----------------------------------------------------------------------------------------------------
# tiling


class Pointwise(torch.nn.Module):
    """A stand-in upscaler that looks at no neighbours: tiling must give exactly the untiled result."""

    scale = 4

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor([0.5, 1.5, -1.0]).view(1, 3, 1, 1))

    def forward(self, x):
        return F.interpolate(torch.sin(3 * x) * self.gain + x, scale_factor=self.scale, mode="nearest")


@pytest.mark.parametrize(("tile", "overlap"), [(8, 4), (12, 0), (10, 6), (16, 8)])
def test_tile_weights_add_up_to_one_everywhere(tile, overlap):
    x = torch.rand(2, 3, 29, 23)
    untiled = upscale_tensor(Pointwise(), x, tile=None)
    assert (upscale_tensor(Pointwise(), x, tile=tile, overlap=overlap) - untiled).abs().max() < 1e-6


def _count_calls(net: torch.nn.Module) -> list[tuple[int, int]]:
    sides: list[tuple[int, int]] = []
    net.register_forward_pre_hook(lambda _, args: sides.append(tuple(args[0].shape[-2:])))
    return sides


def test_tiled_equals_untiled_32_to_128():
    """With the overlap covering what each output pixel looks at (an RRDBNet with no RRDB blocks sees
    about 4 input pixels; overlap/4 of each tile edge is discarded), tiles reproduce the whole run."""
    torch.manual_seed(3)
    net = RRDBNet(nf=NF, nb=0, gc=GC, scale=4).eval()
    x = torch.rand(1, 3, 32, 32)
    untiled = upscale_tensor(net, x, tile=None)
    sides = _count_calls(net)
    tiled = upscale_tensor(net, x, tile=24, overlap=16)
    assert tiled.shape == untiled.shape == (1, 3, 128, 128)
    assert len(sides) == 4 and max(max(s) for s in sides) <= 24
    assert (tiled - untiled).abs().max() < 1e-4
    # the comparison can fail: tiles cut without overlap show their zero-padded edges
    assert (upscale_tensor(net, x, tile=16, overlap=0) - untiled).abs().max() > 1e-3


def test_tiled_unshuffle_model_on_odd_sides():
    torch.manual_seed(4)
    net = RRDBNet(nf=NF, nb=0, gc=GC, scale=2, unshuffle=2).eval()
    x = torch.rand(1, 3, 45, 38)
    untiled = upscale_tensor(net, x, tile=None)
    sides = _count_calls(net)
    tiled = upscale_tensor(net, x, tile=34, overlap=28)  # it sees ~6 input pixels: overlap / 4 = 7
    assert tiled.shape == (1, 3, 90, 76)
    assert len(sides) == 6 and all(h % 2 == 0 and w % 2 == 0 for h, w in sides)  # 3 rows, 2 columns
    assert (tiled - untiled).abs().max() < 1e-4


def test_tiles_of_a_real_sized_network_blend_without_seams():
    """A 1-block RRDBNet sees further than any small overlap: tiles differ from the whole run, but the
    cross-fade keeps the difference small and spread, rather than a step at each tile edge."""
    torch.manual_seed(5)
    net = RRDBNet(nf=NF, nb=1, gc=GC, scale=2).eval()
    x = F.interpolate(torch.rand(1, 3, 8, 8), size=(48, 48), mode="bilinear", align_corners=False)
    untiled = upscale_tensor(net, x, tile=None)
    blended = (upscale_tensor(net, x, tile=24, overlap=16) - untiled).abs().max()
    cut = (upscale_tensor(net, x, tile=16, overlap=0) - untiled).abs().max()
    assert blended < cut / 2


# ----------------------------------------------------------------------------------------------------
# A1111's hires-fix rule on images


def _image(side: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def tiny() -> RRDBNet:
    return load_upscaler(TINY)  # per test: each one hooks its forward to count the passes


@pytest.mark.parametrize(
    ("size", "runs"),
    [((64, 64), 1), ((128, 128), 2), ((100, 100), 2), ((80, 48), 2), ((512, 512), 3), ((32, 32), 0), ((20, 24), 0)],
)
def test_upscale_image_runs_the_model_until_big_enough(tiny, size, runs):
    """Upscaler.upscale: scale = max(w / W, h / H); model passes until both sides reach the target
    rounded down to multiples of 8, three at most; no pass when the target is not larger."""
    sides = _count_calls(tiny)
    out = upscale_image(tiny, _image(), size, tile=None)
    assert out.size == size and out.mode == "RGB"
    assert len(sides) == runs
    assert sides == [(32 * 2**i, 32 * 2**i) for i in range(runs)]


def test_upscale_image_pixels_follow_a1111(tiny):
    """One pass = BGR channels in (A1111's pil_image_to_torch_bgr), clamp, x255, round, back to RGB;
    a target off the multiple-of-8 grid is reached by two Lanczos resizes, as A1111 does them."""
    image = _image()
    bgr = torch.from_numpy(np.asarray(image)[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = tiny(bgr)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    once = Image.fromarray(np.round(y * 255).astype(np.uint8)[:, :, ::-1].copy(), "RGB")
    assert np.array_equal(np.asarray(upscale_image(tiny, image, (64, 64), tile=None)), np.asarray(once))
    # 36 x 36: dest = 36 // 8 * 8 = 32 -> one pass (64), Lanczos to 32, then Lanczos to 36
    lanczos = Image.Resampling.LANCZOS
    expected = once.resize((32, 32), resample=lanczos).resize((36, 36), resample=lanczos)
    assert np.array_equal(np.asarray(upscale_image(tiny, image, (36, 36), tile=None)), np.asarray(expected))
    rgb = upscale_image(tiny, image, (64, 64), tile=None, bgr=False)
    assert not np.array_equal(np.asarray(rgb), np.asarray(once))


def test_upscale_image_feeds_bgr_and_a_1x_model_runs_once():
    seen = []

    class Same(torch.nn.Module):
        scale = 1

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            seen.append(x.clone())
            return x

    image = _image(16)
    out = upscale_image(Same(), image, (40, 40), tile=None)
    assert len(seen) == 1 and out.size == (40, 40)  # same size after a pass: A1111 stops there
    blue = torch.from_numpy(np.asarray(image)[:, :, 2].astype(np.float32) / 255)
    assert torch.equal(seen[0][0, 0], blue)


def test_the_shipped_tiny_upscaler(tiny):
    """jobs/upscalers/tiny-rrdb-x2.safetensors: small, Real-ESRGAN x2plus-shaped, made by its script."""
    assert TINY.stat().st_size < 100_000
    info = read_upscaler(TINY)
    assert (info.layout, info.scale, info.unshuffle, info.nf, info.nb, info.gc) == ("real-esrgan", 2, 2, 8, 1, 4)
    spec = importlib.util.spec_from_file_location("make_upscaler", ROOT / "jobs" / "make_upscaler.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    made = maker.tiny_rrdb_x2()
    assert tiny.state_dict().keys() == made.keys()
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in made.items())


# ----------------------------------------------------------------------------------------------------
# refusals


def refused(path: Path, *needles: str) -> str:
    with pytest.raises(UpscalerError) as caught:
        read_upscaler(path)
    message = str(caught.value)
    assert isinstance(caught.value, InputError)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("wrapper", [None, "params_ema"])
def test_refuses_pickle_with_code_without_running_it(tmp_path, wrapper):
    marker = tmp_path / "pwned"
    tensors = {**real_esrgan_state(), "conv_hr.weight": _Payload(marker)}
    path = write(tmp_path / "evil.pth", tensors, wrapper)
    refused(path, "refused to load")
    with pytest.raises(UpscalerError):
        load_upscaler(path)
    assert not marker.exists()


def test_refuses_other_architectures_naming_them(tmp_path):
    z = torch.zeros
    swinir = {"conv_first.weight": z(60, 3, 3, 3), "layers.0.residual_group.blocks.0.attn.qkv.weight": z(180, 60)}
    refused(write(tmp_path / "swinir.safetensors", swinir), "not an ESRGAN", "SwinIR")
    compact = {"body.0.weight": z(64, 3, 3, 3), "body.0.bias": z(64), "body.1.weight": z(64)}
    refused(write(tmp_path / "compact.pth", compact, "params"), "Compact")
    sd = {"model.diffusion_model.input_blocks.0.0.weight": z(320, 4, 3, 3), "first_stage_model.x": z(1)}
    refused(write(tmp_path / "sd.safetensors", sd), "SD 1.x checkpoint")
    refused(write(tmp_path / "odd.safetensors", {"foo.weight": z(2), "bar": z(1)}), "2 tensors", "foo.weight")
    esrgan_plus = to_esrgan(real_esrgan_state(), NB, 2) | {"model.1.sub.0.RDB1.conv1x1.weight": z(8, 8, 1, 1)}
    refused(write(tmp_path / "plus.pth", esrgan_plus), "ESRGAN+")


def test_refuses_damaged_files(tmp_path):
    path = write(tmp_path / "cut.safetensors", real_esrgan_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(path, "truncated")
    pth = write(tmp_path / "cut.pth", real_esrgan_state(), "params_ema")
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    refused(pth, "truncated or corrupted")
    (tmp_path / "empty.pth").write_bytes(b"")
    refused(tmp_path / "empty.pth", "empty")


def test_refuses_missing_extra_and_misshapen_layers_naming_one(tmp_path):
    state = real_esrgan_state()
    missing = {k: v for k, v in state.items() if k != "body.1.rdb2.conv3.weight"}
    refused(write(tmp_path / "missing.safetensors", missing), "body.1.rdb2.conv3.weight", "missing")
    old = {k: v for k, v in to_esrgan(state, NB, 2).items() if k != "model.1.sub.1.RDB2.conv3.0.weight"}
    refused(write(tmp_path / "old-missing.pth", old), "model.1.sub.1.RDB2.conv3.0.weight", "missing")
    bsr = {k: v for k, v in to_basicsr_old(state).items() if k != "upconv2.weight"}
    refused(write(tmp_path / "bsr-missing.pth", bsr), "old BasicSR layout", "upconv2.weight missing")
    late = to_esrgan(state, NB, 2) | {"model.12.weight": torch.zeros(8, 8, 3, 3)}
    refused(write(tmp_path / "late.pth", late), "model.10, model.12", "do not end as ESRGAN's")
    extra = state | {"body.0.rdb1.conv6.weight": torch.zeros(4, 8, 3, 3)}
    refused(write(tmp_path / "extra.safetensors", extra), "body.0.rdb1.conv6.weight")
    refused(write(tmp_path / "noise.pth", state | {"whatever": torch.zeros(1)}), "whatever")
    bent = to_esrgan(state | {"conv_hr.weight": torch.zeros(8, 8, 1, 1)}, NB, 2)
    refused(write(tmp_path / "bent.pth", bent), "model.8.weight", "[8, 8, 1, 1]", "[8, 8, 3, 3]")
    rgba = real_esrgan_state(in_nc=4)
    refused(write(tmp_path / "rgba.safetensors", rgba), "reads 4 and writes 3 channels")


def test_load_refuses_non_finite_weights(tmp_path):
    state = real_esrgan_state()
    state["body.0.rdb3.conv5.bias"][2] = float("nan")
    with pytest.raises(UpscalerError, match=r"body\.0\.rdb3\.conv5\.bias holds NaN"):
        load_upscaler(write(tmp_path / "nan.safetensors", state))


def test_reading_a_file_imports_no_torch(tmp_path):
    write(tmp_path / "a.pth", to_esrgan(real_esrgan_state(), NB, 2))
    write(tmp_path / "b.pth", real_esrgan_state(in_nc=12), "params_ema")
    write(tmp_path / "c.safetensors", {"foo": torch.zeros(1)})
    code = (
        "import sys\n"
        "from sdbatch.upscale import UpscalerError, read_upscaler\n"
        f"print(read_upscaler({str(tmp_path / 'a.pth')!r}).scale, read_upscaler({str(tmp_path / 'b.pth')!r}).scale)\n"
        "try:\n"
        f"    read_upscaler({str(tmp_path / 'c.safetensors')!r})\n"
        "except UpscalerError as e:\n"
        "    print('refused')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "2", "refused"]
