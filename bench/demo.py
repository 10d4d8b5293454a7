"""How fast the README's first command renders: `sdbatch run jobs/demo.yaml`, timed end to end.

    python bench/demo.py            # prints images/s for the demo job on this machine

Runs the real command in a subprocess into a fresh folder, so the figure includes Python and
torch start-up and model loading (`wall`) as a user sees it, and the summary's own rate from the
first batch to the last image written (`render`). The peer in the same run is the same job at
batch size 1 (one image per UNet call), as a one-image-at-a-time tool would render it.
"""

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*extra: str) -> tuple[int, float, float]:
    out = tempfile.mkdtemp(prefix="sdbatch-demo-")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sdbatch", "run", str(ROOT / "jobs" / "demo.yaml"), "-o", out, *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    m = re.search(r"done: (\d+) rendered.* in ([\d.]+) s", done.stdout)
    images, seconds = int(m[1]), float(m[2])
    return images, images / seconds, images / wall


def main() -> None:
    import torch

    rows = [("auto batch (default)", *run()), ("batch size 1", *run("--batch-size", "1"))]
    print(
        f"\nsdbatch run jobs/demo.yaml on {platform.processor() or 'CPU'}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}\n"
    )
    print("| setting | images | render img/s | wall img/s (incl. start-up) |")
    print("|---|---|---|---|")
    for name, images, render, wall in rows:
        print(f"| {name} | {images} | {render:.2f} | {wall:.2f} |")
    print(f"\nauto batch vs batch 1: {rows[0][2] / rows[1][2]:.2f}x render throughput")


if __name__ == "__main__":
    main()
