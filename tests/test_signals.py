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


def test_an_interrupt_that_passed_through_c_run_python_still_exits_130(tmp_path):
    """The cause of a rare `-2` instead of 130: a KeyboardInterrupt raised while C code runs Python
    through PyRun_String (torch's import does) sets CPython's unhandled-Ctrl-C flag for good, and
    under `python -m` Py_RunMain then kills the process with SIGINT after sys.exit(130). Here the
    interrupt is made to go through PyRun_SimpleString; the same module exiting by sys.exit(130)
    dies by SIGINT (the test can fail), sdbatch's main exits 130."""
    (tmp_path / "interrupt_via_c.py").write_text(
        textwrap.dedent(
            """
            import ctypes, sys
            import sdbatch.cli

            def app(prog_name):
                ctypes.pythonapi.PyRun_SimpleString(b"raise KeyboardInterrupt")
                raise KeyboardInterrupt

            sdbatch.cli.app = app
            if sys.argv[1] == "sys.exit":
                try:
                    app("sdbatch")
                except KeyboardInterrupt:
                    sys.exit(130)
            else:
                from sdbatch.__main__ import main

                main()
            """
        )
    )

    def status(how: str) -> int:
        command = [sys.executable, "-m", "interrupt_via_c", how]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120).returncode

    assert status("sys.exit") == -signal.SIGINT
    assert status("main") == 130


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one, on purpose
def test_an_interrupt_python_dropped_in_a_del_still_stops_the_run_before_it_renders(tmp_path, monkeypatch):
    """Python prints and drops a KeyboardInterrupt raised inside a `__del__` (a library's cleanup
    while the CLI imports): the entry point's handler counts it, and the run then stops at once."""
    from sdbatch.errors import Interrupts, on_interrupt
    from sdbatch.jobs import load_job
    from sdbatch.runner import Options, Reporter, run_job

    class Dropped:
        def __del__(self):
            on_interrupt(signal.SIGTERM, None)  # as if the signal landed here

    monkeypatch.setattr(Interrupts, "seen", 0)
    Dropped()  # Python prints "Exception ignored in ..." and goes on
    assert Interrupts.seen == 1
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(JOB))
    rendered = []
    with pytest.raises(KeyboardInterrupt):
        run_job(load_job(job), Options(), Reporter(), render=lambda batch: rendered.extend(batch) or [])
    assert rendered == [] and not list((tmp_path / "outputs").glob("**/*.png"))


def test_an_interrupt_during_an_import_lets_the_import_finish_and_the_command_exits_130(tmp_path, monkeypatch):
    """A signal landing while a module is imported raises nothing there: torch's import runs Python
    from C++ (pybind11), where a KeyboardInterrupt cannot unwind and C++ aborts the process (SIGABRT,
    exit 134: 2 times in 60 SIGINTs during startup). The import finishes; the count stops a run at
    its start (test above) and makes any other command exit 130 once its work is done."""
    import typer

    from sdbatch.cli import _guard
    from sdbatch.errors import Interrupts

    (tmp_path / "slowmod.py").write_text(
        "import signal\nfrom sdbatch.errors import on_interrupt\n"
        "on_interrupt(signal.SIGINT, None)  # as if the signal landed here\ndone = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(Interrupts, "seen", 0)
    monkeypatch.setattr(Interrupts, "deferred", 0)
    import slowmod

    assert slowmod.done and (Interrupts.seen, Interrupts.deferred) == (1, 1)
    with pytest.raises(typer.Exit) as e, _guard():
        pass  # the command's work, done
    assert e.value.exit_code == 130
    monkeypatch.setattr(Interrupts, "deferred", 0)
    with pytest.raises(KeyboardInterrupt):  # outside an import: raised at once, as before
        from sdbatch.errors import on_interrupt

        on_interrupt(signal.SIGINT, None)
