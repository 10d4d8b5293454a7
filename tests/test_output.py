"""PNG metadata in A1111's format, the manifest's crash rules, file names and contact sheets."""

import json
from pathlib import Path

from PIL import Image

from sdbatch.jobs import Task
from sdbatch.output.a1111 import parse_a1111_parameters
from sdbatch.output.manifest import Manifest
from sdbatch.output.names import file_name, slug
from sdbatch.output.png import png_bytes, read_png_text
from sdbatch.output.sheets import build_sheets, sheet_axes
from sdbatch.recipe import Recipe


def task(**kw) -> Task:
    base = dict(prompt="a red circle", seed=5, steps=20, sampler="euler_a", cfg=7.0, size=(32, 32))
    return Task(3, 0, "0123456789abcdef", Recipe(**(base | kw)))


def a1111_parameters(t: Task, model_hash: str, model_name: str, version: str) -> str:
    return t.recipe.to_a1111({"Model hash": model_hash, "Model": model_name}, version)


def test_parameters_text_is_a1111s_format():
    text = a1111_parameters(task(negative="blurry, dark"), "abcdef1234", "demo", "0.1.0")
    assert text == (
        "a red circle\nNegative prompt: blurry, dark\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 32x32, Model hash: abcdef1234, "
        "Model: demo, Version: sdbatch 0.1.0"
    )
    img2img = a1111_parameters(
        task(sampler="dpmpp_2m", karras=True, init_image="a.png", strength=0.3, cfg=7.5), "h", "m", "v"
    )
    assert img2img.endswith(
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 5, Size: 32x32, "
        "Model hash: h, Model: m, Denoising strength: 0.3, Version: sdbatch v"
    )
    assert "Negative prompt" not in img2img  # A1111 leaves the line out when there is none


def test_a_real_a1111_infotext_parses():
    text = (
        "masterpiece, best quality, (red:1.2) circle\nNegative prompt: lowres, bad anatomy\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, "
        'Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", '
        "Version: v1.10.1"
    )
    p = parse_a1111_parameters(text)
    assert p["Prompt"] == "masterpiece, best quality, (red:1.2) circle"
    assert p["Negative prompt"] == "lowres, bad anatomy"
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["Seed"], p["Size"]) == (
        "20",
        "DPM++ 2M",
        "Karras",
        "1234567890",
        "512x768",
    )
    assert p["Lora hashes"] == "a: 1, b: 2"


def test_parameters_round_trip_through_a_png(tmp_path):
    t = task(prompt="line one\nline two, with: colon", negative="ünïcode")
    text = a1111_parameters(t, "abcdef1234", "my, model", "0.1.0")
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), {"parameters": text, "sdbatch": json.dumps({"a": 1})}))
    chunks = read_png_text(path)
    p = parse_a1111_parameters(chunks["parameters"])
    assert p["Prompt"] == t.prompt and p["Negative prompt"] == t.negative
    assert p["Model"] == "my, model" and p["Seed"] == "5"
    assert json.loads(chunks["sdbatch"]) == {"a": 1}


def test_manifest_skips_a_torn_line_and_fences_it_off(tmp_path):
    m = Manifest(tmp_path)
    m.append({"id": "a", "status": "ok"})
    with open(m.path, "a") as f:
        f.write('{"id": "b", "sta')  # a power cut mid-line
    m.append({"id": "c", "status": "ok"})
    assert [e["id"] for e in m.read()] == ["a", "c"]
    assert m.skipped_lines == 1
    assert all(line.endswith("}") or line.endswith("sta") for line in m.path.read_text().splitlines())


def test_file_names_are_safe():
    name = file_name("{index:05d}-{seed}-{slug}", task(prompt="A Red/Circle: ../../etc?*"))
    assert name == "00003-5-a-red-circle-etc.png"
    assert slug("x" * 100) == "x" * 40
    assert slug("!!!") == "empty"
    assert file_name("../{seed}", task()) == "5.png"


def _grid(folder: Path, xs, ys, side=32) -> list[dict]:
    entries = []
    for i, (cfg, seed) in enumerate((c, s) for s in ys for c in xs):
        name = f"{i:05d}.png"
        Image.new("RGB", (side, side), (i % 256, 0, 0)).save(folder / name)
        entries.append(
            {"id": str(i), "file": name, "status": "ok", "prompt": "p", "seed": seed, "cfg": cfg, "size": [side, side]}
        )
    return entries


def test_default_sheet_axes():
    entries = [{"prompt": p, "seed": s, "cfg": c} for p in "ab" for s in (1, 2) for c in (3, 4)]
    spec = sheet_axes(entries, {})
    assert (spec.x, spec.y, spec.pages) == ("seed", "prompt", ["cfg"])
    spec = sheet_axes(entries, {"x": "cfg", "y": "seed"})
    assert (spec.x, spec.y, spec.pages) == ("cfg", "seed", ["prompt"])


def test_sheet_has_a_cell_per_image_and_labels(tmp_path):
    entries = _grid(tmp_path, [1, 7.5, 12], [10, 11])
    [sheet] = build_sheets(tmp_path, 0, entries, {"x": "cfg", "y": "seed"}, "title")
    with Image.open(sheet) as im:
        assert sheet.parent.name == "sheets"
        # 3 columns and 2 rows of 128 px cells (32 px images enlarged 4x), plus labels
        assert 3 * 128 < im.width < 3 * 128 + 400 and 2 * 128 < im.height < 2 * 128 + 200
        px = im.convert("RGB")
        reds = {
            px.getpixel((x, y))[0] for x in range(im.width) for y in range(im.height) if px.getpixel((x, y))[1] == 0
        }
        assert set(range(6)) <= reds  # every image's own colour is on the sheet


def test_large_grids_are_split_never_huge(tmp_path):
    entries = _grid(tmp_path, list(range(40)), list(range(30)), side=64)
    sheets = build_sheets(tmp_path, 0, entries, {"x": "cfg", "y": "seed"}, "big")
    assert len(sheets) > 1
    for path in sheets:
        with Image.open(path) as im:
            assert max(im.size) <= 4096
