"""img2img over a folder of images (`init_image: {folder: ..., glob: ...}`), with the demo model:
the folder expands into the init_image axis in sorted order, hidden and non-image files are skipped,
bad folders and images are file:line errors, outputs keep their source's name, and a re-run renders
only what is new or changed."""

import json
from pathlib import Path

import pytest
from PIL import Image

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


def test_a_folder_of_masks_is_refused_rather_than_multiplied_with_the_images(tmp_path):
    photos(tmp_path / "photos")
    with pytest.raises(JobError, match=r"job.yaml:8: mask: a folder of masks .* is not supported yet"):
        load_job(job(tmp_path, "{folder: photos}", "mask: {folder: photos}\n"))
