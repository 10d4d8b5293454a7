"""Same images whatever renders them: 1 or 2 worker processes, batch 1 or 4, two shards into one
folder, Ray actors; a worker killed mid-job; out-of-memory back-off."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPORT
from PIL import Image

from sdbatch.errors import InputError
from sdbatch.jobs import load_job
from sdbatch.render import parse_devices, with_backoff
from sdbatch.runner import Options, Reporter, run_job

JOB = """
name: same
steps: 6
prompt: [a big red circle on a blue background, 'a small white square at the top, black background']
seed: 1-5
cfg: [1, 6]
"""


class Quiet(Reporter):
    pass


def render_job(tmp_path: Path, folder: str, **options) -> Path:
    job_file = tmp_path / "job.yaml"
    if not job_file.exists():
        job_file.write_text(JOB)
    out = tmp_path / folder
    summary = run_job(load_job(job_file), Options(output=out, **options), Quiet())
    assert summary.exit_code == 0, summary.failed
    return out


def images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


def manifest_entries(folder: Path) -> list[dict]:
    entries = []
    for path in folder.glob("manifest*.jsonl"):
        entries += [json.loads(line) for line in path.read_text().splitlines()]
    return entries


def compare(a: Path, b: Path, label: str) -> None:
    x, y = images(a), images(b)
    assert sorted(x) == sorted(y) and len(x) == 20
    diffs = [int(np.abs(x[k] - y[k]).max()) for k in x]
    REPORT.append(f"{label}: {sum(d == 0 for d in diffs)}/{len(diffs)} images bitwise equal, max diff {max(diffs)}/255")
    assert max(diffs) <= 1
    entries = manifest_entries(b)
    assert sorted(e["file"] for e in entries) == sorted(y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ref")
    return tmp, render_job(tmp, "one", device="cpu", batch_size=4)


def test_two_worker_processes_give_the_same_images(reference):
    tmp, one = reference
    compare(one, render_job(tmp, "two", device="cpu*2", batch_size=4), "2 CPU worker processes vs 1")


def test_batch_size_does_not_change_images(reference):
    tmp, one = reference
    compare(one, render_job(tmp, "b1", device="cpu", batch_size=1), "batch size 1 vs 4")


def test_two_shards_fill_one_folder_with_the_same_images(reference):
    tmp, one = reference
    render_job(tmp, "sharded", device="cpu", batch_size=4, shard=(0, 2))
    out = render_job(tmp, "sharded", device="cpu", batch_size=4, shard=(1, 2))
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == [
        "manifest-shard-0-of-2.jsonl",
        "manifest-shard-1-of-2.jsonl",
    ]
    compare(one, out, "shards 0/2 + 1/2 vs unsharded")
    assert list((out / "sheets").glob("*.png"))  # the last shard to finish builds the sheets
    assert len({e["id"] for e in manifest_entries(out)}) == 20


def test_ray_backend_gives_the_same_images(reference):
    import ray  # in the test extra, so CI runs this on a local Ray instance

    tmp, one = reference
    try:
        out = render_job(tmp, "ray", device="cpu*2", batch_size=4, backend="ray")
    finally:
        ray.shutdown()
    compare(one, out, "ray backend (2 CPU actors) vs local")


def test_a_killed_worker_does_not_lose_images(tmp_path):
    (tmp_path / "job.yaml").write_text(JOB.replace("seed: 1-5", "seed: 1-12"))
    cmd = [sys.executable, "-m", "sdbatch", "run", "job.yaml", "--devices", "cpu*2", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = tmp_path / "outputs" / "same" / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while not (manifest.exists() and len(manifest.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "stuck"
        time.sleep(0.05)
    workers = [pid for pid in _children(proc.pid) if "spawn_main" in _cmdline(pid)]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "died" in err
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(entries) == 48 and len({e["id"] for e in entries}) == 48 and all(e["status"] == "ok" for e in entries)
    assert len(list(manifest.parent.glob("*.png"))) == 48


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_out_of_memory_halves_the_batch_and_loses_nothing():
    calls = []

    def render(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [(f"image {t}", None) for t in batch]

    run = with_backoff(render)
    assert run(list(range(8))) == [(f"image {t}", None) for t in range(8)]
    assert calls[:3] == [8, 4, 2] and run.limit[0] == 2
    calls.clear()
    assert len(run(list(range(6)))) == 6 and max(calls) == 2  # later batches start at the smaller size


def test_a_single_image_that_does_not_fit_fails_alone():
    def render(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    [(image, error)] = with_backoff(render)(["t"])
    assert image is None and "out of memory" in error


def test_other_errors_are_not_mistaken_for_out_of_memory():
    def render(batch):
        raise ValueError("bad")

    with pytest.raises(ValueError):
        with_backoff(render)([1, 2])


GPUS = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cpu", ["cpu"]), ("cpu*2", ["cpu", "cpu"]), ("cpu,cpu", ["cpu", "cpu"]), ("auto", GPUS or ["cpu"])],
)
def test_device_lists(text, expected):
    assert parse_devices(text) == expected


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cpu*x", "tpu:0"])
def test_bad_device_lists(text):
    with pytest.raises(InputError, match="--devices"):
        parse_devices(text)


@pytest.mark.slow
def test_the_gpu_sessions_check_script_runs_on_the_cpu(tmp_path):
    """bench/gpu_check.py is what a GPU session runs in its few minutes: its CPU smoke mode runs the
    checks a CPU can (the others say SKIP), so the script cannot rot between GPU sessions."""
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True
    )
    report = (tmp_path / "gpu_check.md").read_text()
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = {line.split()[1].rstrip(":"): line.split()[0] for line in report.splitlines()}
    assert statuses["renders"] == statuses["worker"] == statuses["env"] == "PASS", report
    assert statuses["randn"] == statuses["oom_backoff"] == "SKIP", report
