"""Images per second of `sdbatch run` by worker count and batch size, all in one process run.

    python bench/scaling.py                       # demo model on CPU: 1 and 2 workers x batch 1,2,4,8
    python bench/scaling.py --images 48 --steps 30
    python bench/scaling.py --sd15 --size 512     # on a GPU: SD1.5-size random weights, fp16

Each cell renders the same job (a prompt x seed grid) into a fresh folder with `run_job`, the code
`sdbatch run` uses. `render img/s` counts from the first batch handed out to the last image
written (model loading excluded); `wall img/s` includes worker start-up and model loading. Ratios
are against 1 worker at batch 1 of the same run, so a busier machine shifts every cell alike.
Prints one markdown table.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdbatch.jobs import load_job
from sdbatch.runner import Options, Reporter, run_job

PROMPTS = [
    "a big red circle on a blue background",
    "a small yellow triangle at the top, black background",
    "a green square on the right, white background",
    "a purple circle that is purple, on orange",
]


def sd15_random(folder: Path) -> str:
    from sdbatch.checkpoints import save_checkpoint
    from sdbatch.models import build_model

    path = folder / "sd15-random.safetensors"
    save_checkpoint(build_model("sd15", dtype=torch.float16), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", default="1,2", help="CPU worker counts (GPU: uses each visible GPU)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--sd15", action="store_true", help="SD1.5-size random weights instead of the demo")
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sdbatch-bench-"))
    model = sd15_random(tmp) if args.sd15 else "demo"
    seeds = max(1, args.images // len(PROMPTS))
    size = f"size: {args.size}\n" if args.size else ""
    job_file = tmp / "bench.yaml"
    job_file.write_text(
        f"name: bench\nmodel: {model}\nsteps: {args.steps}\n{size}cfg: 7.5\n"
        f"prompt: [{', '.join(repr(p) for p in PROMPTS)}]\nseed: 1-{seeds}\n"
    )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    worker_sets = [["cuda:0"], [f"cuda:{i}" for i in range(gpus)]] if gpus else []
    worker_sets = worker_sets or [["cpu"] * int(n) for n in args.workers.split(",")]
    worker_sets = list({",".join(w): w for w in worker_sets}.values())

    rows, base = [], None
    for devices in worker_sets:
        for batch in (int(b) for b in args.batches.split(",")):
            out = tmp / f"out-{len(devices)}-{batch}"
            start = time.perf_counter()
            summary = run_job(
                load_job(job_file), Options(output=out, device=",".join(devices), batch_size=batch), Reporter()
            )
            wall = time.perf_counter() - start
            render = summary.rendered / summary.seconds
            base = base or render
            rows.append(
                (
                    len(devices),
                    devices[0].split(":")[0],
                    batch,
                    summary.rendered,
                    render,
                    summary.rendered / wall,
                    render / base,
                )
            )
            print(f"  {len(devices)} x {devices[0]} batch {batch}: {render:.2f} img/s", file=sys.stderr)

    device = torch.cuda.get_device_name(0) if gpus else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    what = "SD1.5-size random weights" if args.sd15 else "demo model"
    print(
        f"\n{what}, {args.steps} steps euler_a, CFG 7.5, {rows[0][3]} images per cell; {device}; "
        f"torch {torch.__version__}\n"
    )
    print("| workers | device | batch | images | render img/s | wall img/s | vs 1 worker, batch 1 |")
    print("|---|---|---|---|---|---|---|")
    for n, dev, batch, count, render, wall, ratio in rows:
        print(f"| {n} | {dev} | {batch} | {count} | {render:.2f} | {wall:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
