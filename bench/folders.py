"""How long validating and planning an img2img job over a large folder takes, and what it holds.

    python bench/folders.py                # 10,000 tiny images (and as many masks) in a temp folder
    python bench/folders.py --images 1000

Writes N small PNGs of three shapes (and N masks) into a temp folder, then times `load_job`
(validation: every image decoded once and hashed from the same read) and `plan_job` (ids, names,
what is done; `size: from_image` resolved per image; the ids reuse the hashes of the validate
read, cached by path, size and mtime). Then the peak of Python's heap over a second validate and
plan: what planning keeps is one small task per image (its recipe and id), never the pixels.
"""

import argparse
import gc
import tempfile
import time
import tracemalloc
from pathlib import Path

from PIL import Image

from sdbatch.jobs import load_job
from sdbatch.plan import plan_job

SHAPES = ((32, 32), (48, 32), (24, 40))


def make_folder(root: Path, n: int) -> Path:
    """N images (and their masks) of three shapes, and a job that inpaints them at their own sizes."""
    (root / "photos").mkdir()
    (root / "masks").mkdir()
    for i in range(n):
        size = SHAPES[i % len(SHAPES)]
        Image.new("RGB", size, (i % 256, i // 256 % 256, 90)).save(root / "photos" / f"p{i:05d}.png")
        Image.new("L", size, 255).save(root / "masks" / f"p{i:05d}.png")
    job = root / "job.yaml"
    job.write_text(
        "prompt: a circle\nsteps: 4\nstrength: 0.5\nseed: 1\noutput: out\nsize: from_image\n"
        "init_image: {folder: photos, glob: '*.png'}\nmask: {folder: masks}\n"
    )
    return job


def measure(n: int, root: Path, trace: bool = True) -> dict[str, float]:
    """Seconds to make the folder, load (validate) the job and plan it, the tasks planned and the
    decoded images still alive then; with `trace`, the peak of Python's heap over a second load and
    plan (measured apart: tracing slows everything down)."""
    began = time.perf_counter()
    path = make_folder(root, n)
    made = time.perf_counter()
    job = load_job(path)
    loaded = time.perf_counter()
    plan = plan_job(job)
    planned = time.perf_counter()
    gc.collect()
    alive = sum(isinstance(o, Image.Image) for o in gc.get_objects())
    figures = {"images": n, "tasks": len(plan.tasks), "images_alive": alive, "make_s": made - began}
    figures |= {"validate_s": loaded - made, "plan_s": planned - loaded}
    if trace:
        del plan, job
        tracemalloc.start()
        plan_job(load_job(path))
        figures["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return figures


def summary(m: dict[str, float]) -> str:
    peak = f", peak Python heap {m['peak_mb']:.0f} MB" if "peak_mb" in m else ""
    return (
        f"{m['images']:,} images + masks: validate (decode + hash) {m['validate_s']:.1f} s, plan {m['plan_s']:.1f} s "
        f"({m['tasks']:,} tasks, {m['images_alive']} decoded images kept){peak}; "
        f"making the folder took {m['make_s']:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    n = parser.parse_args().images
    with tempfile.TemporaryDirectory() as tmp:
        print(summary(measure(n, Path(tmp))))


if __name__ == "__main__":
    main()
