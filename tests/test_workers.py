"""Device workers belong to the main process: they die with it (even under SIGKILL), ignore the
SIGTERM / Ctrl-C sent to the whole process group (the main process finishes the batches in flight),
and a model no worker can load is bad input (exit 2). Joining a Ray cluster is bounded in time."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdbatch.errors import InputError
from sdbatch.jobs import load_job
from sdbatch.render import make_executor
from sdbatch.render.ray import RayPool
from sdbatch.render.worker import ModelSpec
from sdbatch.runner import Options, Reporter, run_job

ROOT = Path(__file__).resolve().parent.parent

JOB = """
name: w
steps: 2
prompt: [a red circle, a blue square]
seed: 1-40
"""


def write_job(tmp_path: Path, body: str = JOB) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def start(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`sdbatch run` in a session of its own, so that signals to its process group reach no test."""
    return subprocess.Popen(
        [sys.executable, "-m", "sdbatch", "run", "job.yaml", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_images(manifest: Path, proc: subprocess.Popen, n: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (manifest.exists() and len(manifest.read_text().splitlines()) >= n):
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.returncode} {proc.stderr.read()}")
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped yet counts: it holds no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def kill_group(proc: subprocess.Popen) -> None:
    """Whatever a failed test left behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds workers through /proc")


@needs_proc
@pytest.mark.slow
def test_workers_and_resource_tracker_die_with_a_killed_main_process(tmp_path):
    write_job(tmp_path)
    proc = start(tmp_path, "--devices", "cpu,cpu", "--batch-size", "1")
    try:
        wait_for_images(tmp_path / "outputs" / "w" / "manifest.jsonl", proc)
        kids = {pid: cmdline(pid) for pid in children(proc.pid)}
        workers = [pid for pid, cmd in kids.items() if "spawn_main" in cmd]
        trackers = [pid for pid, cmd in kids.items() if "resource_tracker" in cmd]
        assert len(workers) == 2 and len(trackers) == 1, kids
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while not all(map(gone, workers + trackers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in workers + trackers if not gone(pid)] == []
    finally:
        kill_group(proc)


@needs_proc
@pytest.mark.slow
def test_workers_killed_with_their_parent_while_they_start_die_at_once(tmp_path):
    """The main process SIGKILLed the moment its workers exist: they are still starting (unpickling
    their spec imports torch, seconds), and must not outlive it by that long (seen: 20 s)."""
    write_job(tmp_path)
    proc = start(tmp_path, "--devices", "cpu,cpu", "--batch-size", "1")
    try:
        deadline = time.monotonic() + 120
        while len(workers := [p for p in children(proc.pid) if "spawn_main" in cmdline(p)]) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "no workers started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 3
        while not all(map(gone, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in workers if not gone(pid)] == []
    finally:
        kill_group(proc)


@needs_proc
@pytest.mark.slow
def test_sigterm_to_the_process_group_finishes_the_batches_in_flight_and_exits_130(tmp_path):
    write_job(tmp_path)
    manifest = tmp_path / "outputs" / "w" / "manifest.jsonl"
    proc = start(tmp_path, "--devices", "cpu,cpu", "--batch-size", "1")
    try:
        wait_for_images(manifest, proc)
        os.killpg(proc.pid, signal.SIGTERM)  # what systemd or SLURM does: the whole group at once
        _, stderr = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, stderr
    assert "died" not in stderr
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert 1 <= len(entries) < 80
    assert [e for e in entries if e["status"] != "ok"] == []
    assert sorted(e["file"] for e in entries) == sorted(p.name for p in manifest.parent.glob("*.png"))


def broken_model(tmp_path: Path) -> Path:
    """The demo model with one UNet key renamed: its header reads fine, so the run starts, and only
    loading the weights (in the workers) finds that it does not fit."""
    folder = tmp_path / "broken"
    shutil.copytree(ROOT / "weights" / "demo", folder)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    key = b'"model.diffusion_model.out.2.weight"'
    assert data.count(key) == 1
    path.write_bytes(data.replace(key, key.replace(b"weight", b"weighx")))
    return path


@pytest.mark.slow
def test_a_model_no_worker_can_load_is_bad_input(tmp_path):
    """InputError, one line, as with one device: the CLI makes it exit 2, not exit 1 with every
    image recorded as failed by "every worker died"."""
    path = broken_model(tmp_path)
    job = write_job(tmp_path, JOB + f"model: {path}\n")
    out = tmp_path / "out"
    with pytest.raises(InputError) as error:
        run_job(load_job(job), Options(output=out, device="cpu,cpu"), Reporter())
    assert str(error.value) == (
        f"{path}: does not fit model config 'demo': 1 missing: model.diffusion_model.out.2.weight; "
        "1 unexpected: model.diffusion_model.out.2.weighx"
    )
    assert not (out / "manifest.jsonl").exists()  # nothing recorded as failed


@pytest.mark.slow
def test_a_model_no_ray_actor_can_load_is_bad_input(tmp_path):
    ray = pytest.importorskip("ray")
    path = broken_model(tmp_path)
    try:
        with pytest.raises(InputError) as error:
            make_executor(str(path), None, "cpu*2", backend="ray")
    finally:
        ray.shutdown()
    assert str(error.value).startswith(f"{path}: does not fit model config 'demo'") and "\n" not in str(error.value)


# -- Ray: a bounded wait for the cluster


@pytest.mark.parametrize("address", ["not an address", "http://", ":::", "ray://", "head:0", "::1"])
def test_a_malformed_ray_address_is_refused_at_once(address):
    started = time.monotonic()
    with pytest.raises(InputError, match="--ray-address") as error:
        make_executor("unused.safetensors", None, "cpu", backend="ray", ray_address=address)
    assert "\n" not in str(error.value) and time.monotonic() - started < 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_address_where_nothing_listens_gives_up_after_the_timeout(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("SDBATCH_RAY_TIMEOUT", "1.5")
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(InputError, match=rf"127\.0\.0\.1:{port}: nothing answered within 1.5 s \(Connection refused\)"):
        RayPool(ModelSpec("unused.safetensors", None, "cpu"), f"127.0.0.1:{port}")
    assert 1 <= time.monotonic() - started < 5


def test_a_bad_ray_timeout_is_bad_input(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("SDBATCH_RAY_TIMEOUT", "soon")
    with pytest.raises(InputError, match="SDBATCH_RAY_TIMEOUT='soon'"):
        RayPool(ModelSpec("unused.safetensors", None, "cpu"), f"127.0.0.1:{closed_port()}")


@pytest.mark.slow
def test_a_port_that_is_not_ray_times_out_with_exit_2(tmp_path):
    """Ray itself would retry such an address for many minutes, holding the output folder's lock."""
    pytest.importorskip("ray")
    write_job(tmp_path)
    with socket.socket() as server:  # takes connections (the kernel's backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        proc = start(tmp_path, "--backend", "ray", "--ray-address", address, env={"SDBATCH_RAY_TIMEOUT": "2"})
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            kill_group(proc)
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines() == [
        f"error: --ray-address {address}: something listens there but did not let us join a Ray cluster within "
        "2 s (another service, another Ray version, or token auth: RAY_AUTH_MODE); SDBATCH_RAY_TIMEOUT=<seconds> "
        "waits longer"
    ]
    assert time.monotonic() - started < 30  # and so the output folder's lock is free again
