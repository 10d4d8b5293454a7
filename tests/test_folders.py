"""img2img over a folder of images (`init_image: {folder: ..., glob: ...}`), with the demo model:
the folder expands into the init_image axis in sorted order, hidden and non-image files are skipped,
bad folders and images are file:line errors, outputs keep their source's name, and a re-run renders
only what is new or changed."""

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdbatch.images import ImageError, fit, open_image, size_from_image
from sdbatch.jobs import JobError, load_job
from sdbatch.plan import plan_job
from sdbatch.runner import Options, Reporter, run_job


def photos(folder: Path) -> Path:
    folder.mkdir()
    for name, size, colour in (("b-red", 32, "red"), ("a-blue", 64, "blue"), ("c-green", 48, "green")):
        Image.new("RGB", (size, size), colour).save(folder / f"{name}.png")
    (folder / "sub").mkdir()
    Image.new("RGB", (32, 32), "white").save(folder / "sub" / "d-white.png")
    Image.new("RGB", (32, 32), "black").save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def job(tmp_path: Path, images: str, extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        f"prompt: a circle\nsteps: 4\nstrength: 0.5\nsize: 32\nseed: 1\noutput: out\ninit_image: {images}\n{extra}"
    )
    return path


def test_a_folder_expands_into_the_init_image_axis_in_sorted_order(tmp_path):
    photos(tmp_path / "photos")
    flat = load_job(job(tmp_path, "{folder: photos, glob: '*.png'}")).runs[0].values["init_image"]
    assert [Path(p).name for p in flat] == ["a-blue.png", "b-red.png", "c-green.png"]
    deep = load_job(job(tmp_path, "{folder: photos, glob: ['*.png', '**/*.png']}")).runs[0].values["init_image"]
    assert [Path(p).name for p in deep] == ["a-blue.png", "b-red.png", "c-green.png", "d-white.png"]
    every = load_job(job(tmp_path, "{folder: photos}")).runs[0].values["init_image"]
    assert len(every) == 3, "no glob: every image directly in the folder; .hidden.png and notes.txt skipped"


def test_skipped_hidden_and_non_image_files_are_said_at_validate(tmp_path):
    photos(tmp_path / "photos")
    done = subprocess.run(
        [sys.executable, "-m", "sdbatch", "validate", str(job(tmp_path, "{folder: photos, glob: '**/*'}"))],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"note: .*photos: skipped 1 hidden and 1 not an image by its suffix \(notes.txt\)", done.stdout)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ("{folder: photos, glob: '*.gif'}", "no image in .* matches \\*.gif"),
        ("{folder: nowhere}", "folder .*nowhere does not exist"),
        ("{folder: photos, pattern: '*'}", "unknown key 'pattern'"),
        ("{folder: photos, glob: '../*.png'}", "glob .* must stay inside the folder"),
        ("{folder: photos, glob: 'broken.jpg'}", ".*broken.jpg: not an image"),
    ],
)
def test_bad_folders_and_images_are_refused_with_their_line(tmp_path, images, message):
    photos(tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(JobError, match=r"job.yaml:7: init_image: " + message):
        load_job(job(tmp_path, images))


def render(path: Path) -> list[dict]:
    summary = run_job(load_job(path), Options(device="cpu"), Reporter())
    assert summary.exit_code == 0
    return [json.loads(line) for line in (path.parent / "out" / "manifest.jsonl").read_text().splitlines()]


def test_outputs_keep_their_source_and_a_rerun_renders_only_new_or_changed_images(tmp_path):
    folder = photos(tmp_path / "photos")
    path = job(tmp_path, "{folder: photos, glob: '*.png'}")
    first = render(path)
    assert sorted(e["file"] for e in first) == ["00000-a-blue-1.png", "00001-b-red-1.png", "00002-c-green-1.png"]
    Image.new("RGB", (32, 32), "yellow").save(folder / "e-yellow.png")
    Image.new("RGB", (32, 32), "purple").save(folder / "f-purple.png")
    assert len(plan_job(load_job(path)).todo) == 2, "two new images: two renders"
    render(path)
    Image.new("RGB", (64, 64), "cyan").save(folder / "a-blue.png")  # its pixels changed: a new task
    assert [Path(t.recipe.init_image).name for t in plan_job(load_job(path)).todo] == ["a-blue.png"]
    entries = render(path)
    assert len(entries) == 6 and len({e["id"] for e in entries}) == 6


# -- masks paired by file stem, sizes taken from each image, A1111's resize modes

SHAPES = {"a": (32, 32), "b": (32, 32), "c": (32, 32), "d": (48, 32), "e": (48, 32), "f": (24, 40), "g": (24, 40)}
MASKED = ("a", "c", "d", "e", "f")  # b and g have no mask


def inputs(root: Path) -> Path:
    """7 images of 3 shapes in photos/, and masks (white left half) for 5 of them in masks/."""
    (root / "photos").mkdir()
    (root / "masks").mkdir()
    for i, (stem, (w, h)) in enumerate(SHAPES.items()):
        Image.new("RGB", (w, h), (40 * i, 200 - 20 * i, 90)).save(root / "photos" / f"{stem}.png")
        if stem in MASKED:
            mask = Image.new("L", (w, h), 0)
            mask.paste(255, (0, 0, w // 2, h))
            mask.save(root / "masks" / f"{stem}.png")
    return root


def inpaint_job(root: Path, size: str, mask: str = "{folder: masks, missing: full}", extra: str = "") -> Path:
    path = root / "job.yaml"
    path.write_text(
        "prompt: a circle\nsteps: 4\nstrength: 0.5\nseed: 1\noutput: out\n"  # lines 1-5
        f"init_image: {{folder: photos}}\nmask: {mask}\nsize: {size}\n{extra}"  # lines 6-8
    )
    return path


def rendered(path: Path) -> dict[str, dict]:
    """Render the job with the demo model; the manifest's entries by their input's stem."""
    entries = render(path)
    assert all(e["status"] == "ok" for e in entries)
    for e in entries:
        with Image.open(path.parent / "out" / e["file"]) as im:
            assert list(im.size) == e["size"], "the image has its recipe's size"
    by_stem = {Path(e["init_image"]).stem: e for e in entries}
    assert len(by_stem) == len(entries), "one image per input"
    return by_stem


def squares(side: int) -> dict[str, tuple[int, int]]:
    return dict.fromkeys(SHAPES, (side, side))


@pytest.mark.parametrize(
    ("size", "resize", "sizes"),
    [
        ("from_image", None, SHAPES),
        ("{width: 32}", None, {**squares(32), "d": (32, 24), "e": (32, 24), "f": (32, 56), "g": (32, 56)}),
        ("{height: 40}", None, {**squares(40), "d": (64, 40), "e": (64, 40), "f": (24, 40), "g": (24, 40)}),
        ("{max_pixels: 1024}", None, {**squares(32), "d": (40, 24), "e": (40, 24), "f": (24, 40), "g": (24, 40)}),
        ("32", "just", squares(32)),
        ("32", "crop", squares(32)),
        ("[32, 24]", "fill", dict.fromkeys(SHAPES, (32, 24))),
    ],
)
def test_a_mask_folder_pairs_by_stem_and_every_size_form_renders_seven_images(tmp_path, size, resize, sizes):
    inputs(tmp_path)
    extra = "mask_missing: full\n" + (f"resize: {resize}\n" if resize else "")  # the run key, as the issue spells it
    path = inpaint_job(tmp_path, size, mask="{folder: masks}", extra=extra)
    out = rendered(path)
    assert sorted(out) == sorted(SHAPES), "7 images with 5 masks: 7 renders, the masks not multiplied in"
    assert {stem: tuple(e["size"]) for stem, e in out.items()} == sizes
    for stem, e in out.items():
        if stem in MASKED:
            assert Path(e["mask"]).name == f"{stem}.png", "each image gets the mask of its own stem"
        else:
            assert e["mask"] is None, "missing: full is img2img of the whole image, recorded without a mask"
        assert e["resize"] == resize


def test_missing_skip_renders_only_the_images_that_have_a_mask(tmp_path):
    inputs(tmp_path)
    out = rendered(inpaint_job(tmp_path, "from_image", "{folder: masks, missing: skip}"))
    assert sorted(out) == sorted(MASKED)
    assert load_job(tmp_path / "job.yaml").check(32, 7.5) == len(MASKED), "validate counts what will render"
    [beside] = load_job(inpaint_job(tmp_path, "from_image", "{folder: masks}", "mask_missing: skip\n")).runs
    [inside] = load_job(inpaint_job(tmp_path, "from_image", "{folder: masks, missing: skip}")).runs
    [a], [b] = beside.values["mask"], inside.values["mask"]
    assert (a.folder, a.masks, a.missing) == (b.folder, b.masks, "skip"), "mask_missing: skip is missing: skip"
    assert all(Path(e["mask"]).stem == stem for stem, e in out.items())


@pytest.mark.parametrize(
    ("mask", "size", "where", "message"),
    [
        ("{folder: masks}", "from_image", 7, "mask: no mask in .*masks for b.png, g.png; add masks of the same"),
        ("{folder: masks, missing: maybe}", "from_image", 7, "mask: missing: must be skip or full"),
        ("masks/a.png\nmask_missing: skip", "from_image", 8, "mask_missing: applies to a mask folder"),
        ("{folder: masks, missing: full}", "32", 6, "init_image: d.png is 48x32, which does not have the aspect"),
        ("{folder: masks, missing: full}", "{width: 30}", 8, "size: width: must be .* a multiple of 8"),
        ("{folder: masks, missing: full}", "{depth: 8}", 8, "size: write size from the image as"),
        # said twice in one run: the run's key was ignored, whatever its value
        ("{folder: masks, missing: full}\nmask_missing: bogus", "from_image", 8, "mask_missing: and the mask's"),
        ("{folder: masks, missing: full}\nmask_missing: skip", "from_image", 8, "mask_missing: and the mask's"),
    ],
)
def test_unpaired_images_bad_keys_and_other_shapes_are_refused_with_their_line(tmp_path, mask, size, where, message):
    inputs(tmp_path)
    with pytest.raises(JobError, match=rf"job.yaml:{where}: {message}"):
        load_job(inpaint_job(tmp_path, size, mask))


def test_a_stray_mask_is_refused_with_its_line(tmp_path):
    inputs(tmp_path)
    Image.new("L", (32, 32), 255).save(tmp_path / "masks" / "zz.png")
    with pytest.raises(JobError, match=r"job.yaml:7: mask: mask zz.png in .*masks matches no init image"):
        load_job(inpaint_job(tmp_path, "from_image"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prompt: a circle\nsize: from_image\n", r"job.yaml:2: size: from_image needs an init_image"),
        ("prompt: a circle\nsize: 32\nresize: crop\n", r"job.yaml:3: resize: applies to images with an init_image"),
    ],
)
def test_image_settings_without_an_image_are_refused_with_their_line(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(JobError, match=message):
        load_job(path)


def test_a_truncated_jpeg_is_a_file_line_error_at_validate_and_nothing_renders(tmp_path):
    import io
    import subprocess
    import sys

    inputs(tmp_path)
    data = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(data, "JPEG")
    (tmp_path / "photos" / "h.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    path = inpaint_job(tmp_path, "from_image")
    for command in ("validate", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "sdbatch", command, str(path)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr
        assert re.search(r"job.yaml:6: init_image: .*h.jpg: not an image Pillow can read", done.stderr), done.stderr
    assert not list(tmp_path.glob("out/*.png")), "nothing rendered"


def test_the_manifest_records_each_source_and_the_sha256_its_id_was_made_from(tmp_path):
    inputs(tmp_path)
    out = rendered(inpaint_job(tmp_path, "from_image"))
    for stem, e in out.items():
        image = tmp_path / "photos" / f"{stem}.png"
        sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
        assert e["sources"]["init_image"] == {"path": str(image), "sha256": sha256}
        if stem in MASKED:
            mask = tmp_path / "masks" / f"{stem}.png"
            assert e["sources"]["mask"]["sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
        else:
            assert "mask" not in e["sources"]


def stripes(size: tuple[int, int], vertical: bool) -> Image.Image:
    """Three bands across the long side: green, red (the centre half), blue."""
    w, h = size
    image = Image.new("RGB", size, (255, 0, 0))
    long = w if vertical else h
    for colour, start, end in (((0, 255, 0), 0, long // 4), ((0, 0, 255), long - long // 4, long)):
        image.paste(colour, (start, 0, end, h) if vertical else (0, start, w, end))
    return image


def test_resize_modes_stretch_crop_the_centre_or_fill_the_borders_with_edge_pixels():
    wide = stripes((64, 32), vertical=True)  # green 0-15, red 16-47, blue 48-63
    with pytest.raises(ImageError, match="the aspect ratios differ"):
        fit(wide, 32, 32, "init_image")  # the default still refuses another shape
    just = fit(wide, 32, 32, "init_image", "just")
    assert just.getpixel((2, 16))[1] > 200 and just.getpixel((16, 16))[0] > 200 and just.getpixel((29, 16))[2] > 200
    crop = fit(wide, 32, 32, "init_image", "crop")
    assert crop.size == (32, 32)
    assert all(crop.getpixel((x, y))[0] > 200 for x in (0, 16, 31) for y in (0, 31)), "the centre (all red) is kept"
    fill = fit(wide, 32, 32, "init_image", "fill")  # the image scaled to 32x16 at rows 8-23
    assert fill.getpixel((16, 16)) == wide.resize((32, 16), Image.Resampling.LANCZOS).getpixel((16, 8))
    for y in (0, 4, 27, 31):  # borders: the top and bottom rows stretched down and up, never black
        assert fill.getpixel((2, y))[1] > 200 and fill.getpixel((16, y))[0] > 200 and fill.getpixel((29, y))[2] > 200
    tall = fit(stripes((32, 64), vertical=False), 32, 32, "mask", "fill")  # left and right borders
    for x in (0, 3, 28, 31):
        assert tall.getpixel((x, 2))[1] > 200 and tall.getpixel((x, 16))[0] > 200 and tall.getpixel((x, 29))[2] > 200
    odd = fit(wide, 32, 25, "init_image", "fill")  # 32x16 inside 25 rows: bands of 4 and 5 rows
    assert odd.getpixel((16, 24))[0] > 200 and odd.getpixel((2, 24))[1] > 200, "no black line left over"
    assert fit(Image.new("L", (64, 32), 255), 16, 16, "mask", "crop").mode == "L"


def test_sizes_from_the_image_round_to_multiples_of_8():
    assert size_from_image((1000, 750), "from_image") == (1000, 752)
    assert size_from_image((1000, 750), "width", 768) == (768, 576)
    assert size_from_image((1000, 750), "height", 768) == (1024, 768)
    w, h = size_from_image((4000, 3000), "max_pixels", 589824)
    assert w * h <= 589824 and w % 8 == h % 8 == 0 and (w, h) == (888, 664)
    assert size_from_image((20, 20), "max_pixels", 589824) == (768, 768), "small images are scaled up to the budget"


def test_planning_ten_thousand_images_keeps_no_pixels_and_prints_the_figure(tmp_path, capsys):
    """bench/folders.py's measure: 10,000 images and masks validated and planned (no timed assert;
    the figure is printed). No decoded image is alive once the plan is made."""
    spec = importlib.util.spec_from_file_location(
        "bench_folders", Path(__file__).parent.parent / "bench" / "folders.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m = bench.measure(10_000, tmp_path, trace=False)
    assert m["tasks"] == 10_000 and m["images_alive"] == 0
    with capsys.disabled():
        print(f"\n{bench.summary(m)}")


def test_a_phone_photo_is_used_as_it_is_shown_exif_orientation_applied(tmp_path):
    """A camera's EXIF orientation (6: turn 90°) is applied, as A1111 applies it: the 32x48 pixels
    stored are a 48x32 picture, and that is the size from_image takes and the pixels img2img sees."""
    (tmp_path / "phone").mkdir()
    stored = Image.new("RGB", (32, 48), "blue")
    stored.paste((255, 0, 0), (0, 0, 32, 8))  # red along the stored top: the shown right edge
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone" / "p.jpg", exif=exif, quality=95)
    image = open_image(tmp_path / "phone" / "p.jpg")
    assert image.size == (48, 32) and image.getpixel((44, 16))[0] > 200 and image.getpixel((4, 16))[2] > 200
    path = tmp_path / "job.yaml"
    path.write_text(
        "prompt: a circle\nsteps: 2\nstrength: 0.5\nseed: 1\noutput: out\n"
        "init_image: {folder: phone}\nsize: from_image\n"
    )
    [entry] = render(path)
    assert entry["size"] == [48, 32]


def test_a_mask_folder_that_is_the_image_folder_is_refused(tmp_path):
    inputs(tmp_path)
    with pytest.raises(JobError, match=r"job.yaml:7: mask: a.png would be its own mask"):
        load_job(inpaint_job(tmp_path, "from_image", "{folder: photos}"))


def test_mask_missing_in_defaults_applies_to_the_runs_with_a_mask_folder_and_yields_to_theirs(tmp_path):
    inputs(tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text(
        "defaults:\n  mask: {folder: masks}\n  mask_missing: skip\n  init_image: {folder: photos}\n"
        "  strength: 0.5\n  size: from_image\nruns:\n  - prompt: a\n  - prompt: b\n    mask: null\n"
        "  - prompt: c\n    mask: {folder: masks, missing: full}\n  - prompt: d\n    mask_missing: full\n"
    )
    a, b, c, d = (run.values["mask"][0] for run in load_job(path).runs)
    assert (a.missing, c.missing, d.missing) == ("skip", "full", "full") and b is None
    path.write_text("defaults:\n  mask_missing: skip\nruns:\n  - prompt: a\n")
    with pytest.raises(JobError, match=r"job.yaml:2: defaults.mask_missing: no run has a mask folder"):
        load_job(path)


@pytest.mark.parametrize("key", ["hires: {scale: 2, denoise: 0.5}", "mask_missing: skip"])
def test_a_block_key_at_top_level_beside_runs_is_refused_not_ignored(tmp_path, key):
    """Like any parameter at top level beside a runs: list (it belongs under defaults:)."""
    path = tmp_path / "job.yaml"
    path.write_text(f"{key}\nruns:\n  - prompt: a\n")
    with pytest.raises(JobError, match=r"job.yaml:1: (hires|mask_missing): parameters at top level and a runs"):
        load_job(path)


def test_rerun_refuses_an_input_image_that_changed_since(tmp_path):
    from sdbatch.errors import InputError
    from sdbatch.rerun import rerun_image

    photos(tmp_path / "p")
    [first, *_] = render(job(tmp_path, "{folder: p, glob: 'b-red.png'}"))
    png = tmp_path / "out" / first["file"]
    Image.new("RGB", (32, 32), "purple").save(tmp_path / "p" / "b-red.png")
    with pytest.raises(InputError, match=r"its init_image .*b-red.png has changed since the image was made"):
        rerun_image(png, tmp_path / "again", device="cpu")


def test_crop_of_an_extreme_aspect_keeps_the_centre_without_resizing_it_whole():
    strip = Image.new("RGB", (4000, 2), "blue")
    strip.paste((255, 0, 0), (2000, 0, 4000, 2))  # red from the middle on: the kept 2 px straddle it
    out = fit(strip, 64, 64, "strip", "crop")
    assert out.size == (64, 64) and out.getpixel((2, 32))[2] > 200 and out.getpixel((61, 32))[0] > 200


def test_a_size_from_an_image_out_of_range_names_the_image(tmp_path):
    (tmp_path / "big").mkdir()
    Image.new("RGB", (9000, 64)).save(tmp_path / "big" / "wide.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "big" / "ok.png")
    path = tmp_path / "job.yaml"
    path.write_text("prompt: x\ninit_image: {folder: big}\nsize: from_image\nstrength: 0.5\n")
    with pytest.raises(JobError, match=r"job.yaml:3: size: wide.png is 9000x64: from_image makes 9000x64") as e:
        load_job(path)
    assert len(e.value.problems) == 1
