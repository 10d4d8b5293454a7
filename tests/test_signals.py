"""SIGTERM is Ctrl-C, at every moment of a real `sdbatch run` (issue 12, class 7): while it starts
(importing, locking, loading the model), twice while it renders, and sent to the whole process
group as systemd and SLURM do. Each time: exit 130, no traceback, no image recorded as failed,
every file whole, and a re-run finishes the job."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

JOB = """
name: term
steps: 50
prompt: [a red circle, a green triangle]
seed: 1-5
"""


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(JOB))
    return subprocess.Popen(
        [sys.executable, "-m", "sdbatch", "run", str(job), "--batch-size", "1", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under systemd or SLURM
    )


def entries(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(entries(out)) < n:
        assert proc.poll() is None, f"run ended early: {proc.returncode} {proc.stderr.read()}"
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.05)


def assert_whole_and_resumable(tmp_path: Path, out: Path) -> None:
    assert all(e["status"] == "ok" for e in entries(out)), "nothing recorded as failed"
    for png in out.glob("*.png") if out.exists() else []:
        with Image.open(png) as im:
            im.load()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name] if out.exists() else True
    again = subprocess.run(
        [sys.executable, "-m", "sdbatch", "run", "job.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert len({e["id"] for e in entries(out)}) == len(entries(out)) == 10


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.4, 2.0])
def test_sigterm_while_starting_exits_130(tmp_path, delay):
    proc = start(tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert_whole_and_resumable(tmp_path, tmp_path / "outputs" / "term")


@pytest.mark.slow
def test_sigterm_twice_while_rendering_exits_130_with_whole_files(tmp_path):
    out = tmp_path / "outputs" / "term"
    proc = start(tmp_path)
    wait_for_lines(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert_whole_and_resumable(tmp_path, out)


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["cpu"])  # several devices: tests/test_workers.py
def test_sigterm_to_the_process_group_finishes_the_images_in_flight(tmp_path, devices):
    """systemd and SLURM signal every process of the group: the workers of a multi-device run
    must leave the stopping to the main process, so the batches in flight are written, not failed."""
    out = tmp_path / "outputs" / "term"
    proc = start(tmp_path, "--devices", devices)
    wait_for_lines(out, 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "failed" not in stderr
    assert_whole_and_resumable(tmp_path, out)
