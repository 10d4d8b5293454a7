"""`sdbatch run` for real (subprocess, shipped demo model): outputs, metadata round trips, exit
codes, resume after SIGKILL, Ctrl-C, and the lock against an overlapping run."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbatch.jobs import load_job
from sdbatch.output.a1111 import parse_a1111_parameters
from sdbatch.output.manifest import output_lock
from sdbatch.output.png import read_png_text
from sdbatch.runner import Options, Reporter, run_job

ROOT = Path(__file__).resolve().parent.parent


def sdbatch(*args: str, cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdbatch", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw
    )


def write_job(tmp_path: Path, body: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


GRID = """
name: grid
defaults:
  steps: 8
runs:
  - prompt: [a red circle on a white background, a blue square on a black background]
    seed: 1-3
    cfg: [1, 7.5]
    sheet: {x: cfg, y: seed}
"""


def test_run_writes_images_manifest_and_sheets_that_round_trip(tmp_path):
    job = write_job(tmp_path, GRID)
    done = sdbatch("run", str(job), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs" / "grid"
    entries = manifest(out)
    assert len(entries) == 12 and all(e["status"] == "ok" for e in entries)
    assert sorted(e["file"] for e in entries) == sorted(p.name for p in out.glob("*.png"))
    for key in ("id", "file", "prompt", "negative", "seed", "steps", "sampler", "cfg", "strength", "size", "status"):
        assert key in entries[0]
    sheets = sorted((out / "sheets").glob("*.png"))
    assert len(sheets) == 2  # x: cfg, y: seed, one sheet per prompt
    assert "done: 12 rendered" in done.stdout

    # the parameters chunk says what the manifest says
    e = entries[4]
    text = read_png_text(out / e["file"])
    p = parse_a1111_parameters(text["parameters"])
    assert p["Prompt"] == e["prompt"] and int(p["Seed"]) == e["seed"] and int(p["Steps"]) == e["steps"]
    assert float(p["CFG scale"]) == e["cfg"] and p["Size"] == "32x32" and p["Sampler"] == "Euler a"
    assert p["Model"] == "demo" and len(p["Model hash"]) == 10
    meta = json.loads(text["sdbatch"])
    assert meta["task"]["id"] == e["id"] and meta["job"] == "grid" and len(meta["model"]["sha256"]) == 64

    shown = sdbatch("inspect", str(out / e["file"]), cwd=tmp_path)
    assert shown.returncode == 0 and e["prompt"] in shown.stdout and str(e["seed"]) in shown.stdout
    again = sdbatch("rerun", str(out / e["file"]), "--output", str(tmp_path / "re"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels(tmp_path / "re" / e["file"]), pixels(out / e["file"]))

    # a second run finds everything done and renders nothing
    second = sdbatch("run", str(job), "--log-json", cwd=tmp_path)
    events = [json.loads(line) for line in second.stdout.splitlines()]
    assert second.returncode == 0 and events[-1]["event"] == "summary"
    assert (events[-1]["rendered"], events[-1]["skipped"]) == (0, 12)
    assert len(manifest(out)) == 12


def test_bad_job_exits_2_and_renders_nothing(tmp_path):
    job = write_job(tmp_path, "prompt: p\nseed: 1-3\nsteps: zero\ncfg_scale: 3\n")
    result = sdbatch("run", str(job), cwd=tmp_path)
    assert result.returncode == 2
    assert "job.yaml:3: steps:" in result.stderr and "job.yaml:4: cfg_scale: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()
    assert sdbatch("validate", str(job), cwd=tmp_path).returncode == 2


def test_overlapping_run_exits_75(tmp_path):
    job = write_job(tmp_path, "name: locked\nprompt: a red circle\n")
    with output_lock(tmp_path / "outputs" / "locked"):
        result = sdbatch("run", str(job), cwd=tmp_path)
    assert result.returncode == 75
    assert "another sdbatch run" in result.stderr
    assert not list((tmp_path / "outputs" / "locked").glob("*.png"))


def test_a_second_run_while_the_first_renders_exits_75(tmp_path):
    job = write_job(tmp_path, KILL_JOB.replace("killed", "overlap"))
    out = tmp_path / "outputs" / "overlap"
    first = _start(job, tmp_path)
    try:
        _wait_for_lines(out / "manifest.jsonl", 1, first)
        second = sdbatch("run", str(job), cwd=tmp_path)
        assert second.returncode == 75, second.stderr
        assert f"pid {first.pid}" in second.stderr  # names the run that holds the folder
    finally:
        first.kill()
        first.wait()


def _start(job: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sdbatch", "run", str(job), "--batch-size", "1"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("run made no progress")


KILL_JOB = """
name: killed
steps: 12
prompt: [a red circle, a green triangle, a blue square]
seed: 1-8
"""


def test_sigkill_then_run_again_completes_every_task_exactly_once(tmp_path):
    job = write_job(tmp_path, KILL_JOB)
    out = tmp_path / "outputs" / "killed"
    proc = _start(job, tmp_path)
    _wait_for_lines(out / "manifest.jsonl", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = manifest(out)
    assert 3 <= len(partial) < 24
    again = sdbatch("run", str(job), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    entries = manifest(out)  # every line is whole JSON
    assert len(entries) == 24 and len({e["id"] for e in entries}) == 24
    assert sorted(e["file"] for e in entries) == sorted(p.name for p in out.glob("*.png"))
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    for p in out.glob("*.png"):
        pixels(p)  # each one a whole PNG


def test_ctrl_c_finishes_the_image_in_flight_and_exits_130(tmp_path):
    job = write_job(tmp_path, KILL_JOB.replace("killed", "interrupted"))
    out = tmp_path / "outputs" / "interrupted"
    proc = _start(job, tmp_path)
    _wait_for_lines(out / "manifest.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    entries = manifest(out)
    assert 2 <= len(entries) < 24
    assert sorted(e["file"] for e in entries) == sorted(p.name for p in out.glob("*.png"))
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert sdbatch("run", str(job), cwd=tmp_path).returncode == 0
    assert len(manifest(out)) == 24


# -- in-process: failures, retries, name collisions


class Collect(Reporter):
    def __init__(self):
        self.images = []

    def image(self, task, file, error, done, todo, rate):
        self.images.append((task.seed, file, error))


def test_a_failed_image_gives_exit_1_and_is_retried_next_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = load_job(write_job(tmp_path, "name: fails\nprompt: p\nseed: [1, 2, 3]\n"))

    def render(batch, bad=2):
        return [(None, "NaN in latents") if t.seed == bad else (Image.new("RGB", (32, 32)), None) for t in batch]

    summary = run_job(job, Options(), Collect(), render=render)
    assert summary.exit_code == 1 and summary.rendered == 2 and len(summary.failed) == 1
    entries = sorted(manifest(tmp_path / "outputs" / "fails"), key=lambda e: e["seed"])  # written as they finish
    assert [e["status"] for e in entries] == ["ok", "failed", "ok"] and entries[1]["file"] is None
    retry = Collect()
    summary = run_job(load_job(job.file), Options(), retry, render=lambda b: render(b, bad=None))
    assert summary.exit_code == 0 and [s for s, _, _ in retry.images] == [2]


def test_colliding_file_names_get_the_task_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = load_job(write_job(tmp_path, "name: same\nprompt: [a, b]\nseed: 7\nfilename: '{seed}'\n"))
    reporter = Collect()
    run_job(job, Options(), reporter, render=lambda b: [(Image.new("RGB", (32, 32)), None)] * len(b))
    files = [f for _, f, _ in reporter.images]
    assert len(set(files)) == 2 and all(f.startswith("7-") for f in files)
