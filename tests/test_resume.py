"""What a re-run does with the folder a killed or damaged run left: every task's image exactly once,
nothing rendered twice, nothing overwritten, nothing written outside the folder (issue 12,
classes 1-6). The renderer is a fast stand-in: these tests are about the folder, not the pixels."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from sdbatch.errors import InputError, OutputLocked
from sdbatch.files import write_atomic
from sdbatch.jobs import load_job
from sdbatch.output.manifest import run_lock
from sdbatch.plan import plan_job
from sdbatch.recipe import Recipe
from sdbatch.runner import Options, Reporter, run_job

ROOT = Path(__file__).resolve().parent.parent

DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from PIL import Image
    from sdbatch.jobs import load_job
    from sdbatch.runner import Options, Reporter, run_job

    def render(batch):
        return [(Image.new("RGB", (32, 32), (t.seed % 256, 7, 7)), None) for t in batch]

    shard = tuple(int(x) for x in sys.argv[3].split("/")) if len(sys.argv) > 3 else None
    options = Options(output=Path(sys.argv[2]), batch_size=1, shard=shard)
    sys.exit(run_job(load_job(sys.argv[1]), options, Reporter(), render=render).exit_code)
    """
)


def fake_render(batch):
    return [(Image.new("RGB", (32, 32), (t.seed % 256, 7, 7)), None) for t in batch]


def write_job(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def lines(folder: Path, name: str = "manifest.jsonl") -> list[dict]:
    """Every line of the manifest, each of which must be whole JSON."""
    return [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]


def run(job: Path, out: Path, **options) -> object:
    return run_job(load_job(job), Options(output=out, batch_size=1, **options), Reporter(), render=fake_render)


def whole_lines(folder: Path) -> list[dict]:
    """The manifest's whole lines (a line the test itself tore is skipped, as sdbatch skips it)."""
    entries = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def assert_complete(job: Path, out: Path, strict: bool = True) -> None:
    """Every task of the job exactly once: one ok line, one PNG carrying its id, nothing else."""
    plan = plan_job(load_job(job), out)
    entries = [e for e in (lines(out) if strict else whole_lines(out)) if e["status"] == "ok"]
    ids = [e["id"] for e in entries]
    assert sorted(ids) == sorted(plan.all_ids), "every id exactly once in the manifest"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(e["file"] for e in entries), "no PNG without its line, no line without its PNG"
    assert not [p for p in pngs if any(p.endswith(f"-{i[:8]}.png") for i in ids)], "no second copy under -id8"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name], "no temp files"
    for e in entries:
        with Image.open(out / e["file"]) as im:
            im.load()
            assert json.loads(im.text["sdbatch"])["task"]["id"] == e["id"]


JOB = """
name: kills
prompt: [a red circle, a blue square, a green triangle]
seed: 1-40
"""


@pytest.mark.slow
def test_sigkill_between_rename_and_manifest_line_never_renders_twice(tmp_path):
    """20+ SIGKILLs, each landing where the image is renamed into place and its line not yet
    written (the writer pauses there under SDBATCH_TEST_PAUSE_AFTER_RENAME), each followed by a
    run that must adopt those images instead of rendering them again as `<name>-<id8>.png`."""
    job, out = write_job(tmp_path, JOB), tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / "renamed.txt"
    env = os.environ | {"SDBATCH_TEST_PAUSE_AFTER_RENAME": str(marker)}
    kills = 0
    for _ in range(22):
        marker.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(driver), str(job), str(out)], cwd=ROOT, env=env)
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text().strip()) and proc.poll() is None:
            assert time.monotonic() < deadline, "the writer never reached the window"
            time.sleep(0.01)
        if proc.poll() is not None:
            break  # everything was already done
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        renamed = marker.read_text().split()
        recorded = {e["file"] for e in lines(out)} if (out / "manifest.jsonl").exists() else set()
        assert (out / renamed[0]).is_file() and renamed[0] not in recorded, "the kill landed in the window"
    assert kills >= 20
    assert subprocess.run([sys.executable, str(driver), str(job), str(out)], cwd=ROOT).returncode == 0
    assert_complete(job, out)
    assert not (out / "aside").exists()  # each orphan was this job's own image: adopted, not moved


@pytest.mark.parametrize("template", [None, "{seed}-{prompt}"])
def test_an_image_renamed_but_not_recorded_is_adopted_after_the_job_is_edited(tmp_path, template):
    """A kill between an image's rename and its line, then seeds added in front (every {index}, and
    so every default name, shifts): the orphan under its old name is its task's image, adopted and
    recorded as it was rendered, never rendered again under the new name (a duplicate)."""
    filename = f"filename: '{template}'\n" if template else ""
    job = write_job(tmp_path, f"name: e\n{filename}prompt: [a red circle, a green square]\nseed: 1-2\n")
    out = tmp_path / "out"
    assert run(job, out).exit_code == 0
    job.write_text(job.read_text().replace("seed: 1-2", "seed: 1-4"))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / "renamed.txt"
    env = os.environ | {"SDBATCH_TEST_PAUSE_AFTER_RENAME": str(marker)}
    proc = subprocess.Popen([sys.executable, str(driver), str(job), str(out)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None, "the writer never reached the window"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    orphan = marker.read_text().split()[0]
    with Image.open(out / orphan) as im:
        rendered = json.loads(im.text["sdbatch"])["task"]
    assert orphan not in {e["file"] for e in whole_lines(out)}, "the kill landed in the window"
    job.write_text(job.read_text().replace("seed: 1-4", "seed: 0-5"))  # every index shifts by one
    rendered_now = []

    def render(batch):
        rendered_now.extend(t.id for t in batch)
        return fake_render(batch)

    options = Options(output=out, batch_size=1)
    assert run_job(load_job(job), options, Reporter(), render=render).exit_code == 0
    assert rendered["id"] not in rendered_now, "the orphan's task was rendered again"
    assert_complete(job, out, strict=False)
    [line] = [e for e in whole_lines(out) if e["id"] == rendered["id"]]
    assert line["file"] == orphan
    assert Recipe.from_record(line) == Recipe.from_record(rendered), "the line's recipe is the image's"
    [task] = [t for t in plan_job(load_job(job), out).tasks if t.id == rendered["id"]]
    assert (line["index"], line["run"]) == (task.index, task.run) and task.index != rendered["index"]  # today's


def _damage(manifest: Path, how: str, rng: random.Random) -> None:
    data = manifest.read_bytes()
    if how == "truncated":
        manifest.write_bytes(data[: rng.randrange(1, len(data))])
    elif how == "emptied":
        manifest.write_bytes(b"")
    elif how == "missing":
        manifest.unlink()
    elif how == "lines dropped":
        kept = [line for line in data.splitlines(keepends=True) if rng.random() < 0.5]
        manifest.write_bytes(b"".join(kept))


@pytest.mark.parametrize("how", ["truncated", "emptied", "missing", "lines dropped"])
def test_a_damaged_manifest_is_rebuilt_from_the_images(tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    job, out = write_job(tmp_path, "name: m\nprompt: [a, b]\nseed: 1-6\n"), tmp_path / "out"
    assert run(job, out).exit_code == 0
    _damage(out / "manifest.jsonl", how, random.Random(how))
    rendered = []

    def render(batch):
        rendered.extend(t.id for t in batch)
        return fake_render(batch)

    summary = run_job(load_job(job), Options(output=out), Reporter(), render=render)
    assert summary.exit_code == 0 and rendered == [], "no image rendered twice"
    assert_complete(job, out, strict=how != "truncated")


def test_a_broken_done_image_is_moved_aside_and_rendered_again(tmp_path, monkeypatch):
    """An `ok` line is trusted only while its file is whole and of the recorded size."""
    monkeypatch.chdir(tmp_path)
    job, out = write_job(tmp_path, "name: b\nprompt: [a, b]\nseed: 1-3\n"), tmp_path / "out"
    run(job, out)
    files = sorted(out.glob("*.png"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    files[1].write_bytes(b"not a png")  # replaced
    Image.new("RGB", (32, 32), "blue").save(files[2])  # replaced by another whole PNG
    damaged = {p.name for p in files[:3]}
    rendered = []

    def render(batch):
        rendered.extend(batch)
        return fake_render(batch)

    summary = run_job(load_job(job), Options(output=out), Reporter(), render=render)
    assert summary.exit_code == 0 and len(rendered) == 3
    assert sorted(p.name for p in (out / "aside").iterdir()) == sorted(damaged)  # kept, not overwritten
    assert_complete_latest(job, out)


def assert_complete_latest(job: Path, out: Path) -> None:
    """Like assert_complete, for a manifest that also holds superseded lines of re-rendered ids."""
    plan = plan_job(load_job(job), out)
    assert sorted(plan.done) == sorted(plan.all_ids) and not plan.todo
    assert sorted(p.name for p in out.glob("*.png")) == sorted(e["file"] for e in plan.done.values())


def test_a_foreign_file_in_the_way_is_moved_aside_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path, "name: f\nprompt: a\nseed: 1\nfilename: '{seed}'\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "1.png").write_bytes(b"someone else's file")
    assert run(job, out).exit_code == 0
    assert (out / "aside" / "1.png").read_bytes() == b"someone else's file"
    assert [e["file"] for e in lines(out)] == ["1.png"]
    assert_complete(job, out)


def test_an_image_of_another_task_keeps_its_name(tmp_path, monkeypatch):
    """A file that is another task's finished image (its line is in the manifest) is never moved:
    the new task takes its name with the id appended."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    first = write_job(tmp_path, "name: t\nprompt: a\nseed: 1\nfilename: same\n")
    run(first, out)
    second = write_job(tmp_path, "name: t\nprompt: b\nseed: 1\nfilename: same\n")
    assert run(second, out).exit_code == 0
    names = sorted(e["file"] for e in lines(out))
    assert names[1] == "same.png" and names[0].startswith("same-") and not (out / "aside").exists()


# -- class 2: one id, one render


@pytest.mark.parametrize(
    "values, distinct",
    [
        ("seed: [1, 1, 2]", 2),
        ("seed: '1-3, 2'", 3),
        ("cfg: [4, 4.0]\nseed: 1", 1),
        ("sampler: [euler_a, euler_ancestral, k_euler_a]\nseed: 1", 1),
        ("strength: [0.3, 0.5, 0.7]\nseed: [1, 2]", 2),
    ],
)
def test_the_same_task_twice_in_a_job_renders_once(tmp_path, monkeypatch, values, distinct):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path, f"name: d\nprompt: a\n{values}\n")
    rendered = []

    def render(batch):
        rendered.extend(t.id for t in batch)
        return fake_render(batch)

    summary = run_job(load_job(job), Options(output=tmp_path / "out"), Reporter(), render=render)
    assert summary.exit_code == 0 and len(rendered) == len(set(rendered)) == distinct
    assert summary.merged == load_job(job).size() - distinct
    assert len(lines(tmp_path / "out")) == distinct


def test_plan_says_duplicates_were_merged(tmp_path):
    job = write_job(tmp_path, "name: d\nprompt: a\nseed: [1, 1, 2, 2, 3]\n")
    result = subprocess.run(
        [sys.executable, "-m", "sdbatch", "plan", str(job)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "2 duplicate" in result.stdout and "3 images" in result.stdout


# -- class 3: locks


@pytest.mark.parametrize(
    "held, wanted, collides",
    [
        (None, (0, 2), True),  # a plain run, then a shard
        ((0, 2), None, True),  # a shard, then a plain run
        ((0, 2), (1, 3), True),  # shards of splits into different n
        ((0, 2), (0, 2), True),  # the same shard twice
        ((0, 2), (1, 2), False),  # the shards of one split run together
        (None, None, True),
    ],
)
def test_runs_that_could_collide_exclude_each_other(tmp_path, held, wanted, collides):
    with run_lock(tmp_path, held):
        script = (
            "import sys; from pathlib import Path; from sdbatch.output.manifest import run_lock\n"
            f"with run_lock(Path({str(tmp_path)!r}), {wanted!r}): pass\n"
        )
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    if collides:
        assert "OutputLocked" in result.stderr and "is being written by" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
    with run_lock(tmp_path, wanted):  # and once the first is gone, the second may run
        pass


def test_a_plain_run_during_a_shard_run_exits_75(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path, "name: s\nprompt: a\nseed: 1-4\n")
    with run_lock(tmp_path / "out", (0, 2)), pytest.raises(OutputLocked):
        run(job, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.png"))


def test_shards_of_one_split_fill_one_folder_exactly_once(tmp_path):
    job, out = write_job(tmp_path, JOB), tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    procs = [subprocess.Popen([sys.executable, str(driver), str(job), str(out), f"{i}/3"], cwd=ROOT) for i in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    entries = [e for name in ("manifest-shard-0-of-3.jsonl", "manifest-shard-1-of-3.jsonl") for e in lines(out, name)]
    entries += lines(out, "manifest-shard-2-of-3.jsonl")
    assert len(entries) == len({e["id"] for e in entries}) == 120


# -- class 4: links


def test_links_in_the_output_folder_are_never_written_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job, out = write_job(tmp_path, "name: l\nprompt: [a, b]\nseed: 1\nfilename: '{slug}'\n"), tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    out.mkdir()
    for name in ("manifest.jsonl", ".sdbatch.lock"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside / "victim.txt")
        with pytest.raises(InputError, match="symbolic link"):
            run(job, out)
        (out / name).unlink()
    (out / "sheets").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError, match="symbolic link"):
        run(job, out)
    (out / "sheets").unlink()
    (out / "a.png").symlink_to(outside / "victim.txt")  # in the way of an image: the link is moved aside
    assert run(job, out).exit_code == 0
    assert (out / "aside" / "a.png").is_symlink() and (out / "a.png").is_file()
    assert (outside / "victim.txt").read_text() == "precious" and sorted(os.listdir(outside)) == ["victim.txt"]


def test_manifest_lines_that_point_outside_the_folder_are_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job, out = write_job(tmp_path, "name: o\nprompt: a\nseed: [1, 2]\n"), tmp_path / "out"
    run(job, out)
    entries = lines(out)
    outside = tmp_path / "stolen.png"
    (out / entries[0]["file"]).rename(outside)
    entries[0]["file"] = "../stolen.png"
    (out / entries[1]["file"]).rename(tmp_path / "abs.png")
    entries[1]["file"] = str(tmp_path / "abs.png")
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert not plan_job(load_job(job), out).done
    assert run(job, out).exit_code == 0
    assert outside.is_file() and (tmp_path / "abs.png").is_file()  # never touched
    assert_complete_latest(job, out)


# -- class 6: a full disk, impossible folders


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    if len(sys.argv) > 4:  # writes past the limit fail with EFBIG, part-way, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))
    """
)


@pytest.mark.parametrize("limit", [2500, 9000])
def test_a_full_disk_stops_the_run_with_a_valid_manifest(tmp_path, limit):
    """Writes fail part-way (RLIMIT_FSIZE: the manifest or an image hits the limit, as on a full
    disk): exit 1 with a clear line, every manifest line whole, and a later run finishes the job."""
    job, out = write_job(tmp_path, "name: full\nprompt: [a, b]\nseed: 1-30\n"), tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(FULL_DISK + DRIVER.replace("len(sys.argv) > 3", "False"))
    result = subprocess.run(
        [sys.executable, str(driver), str(job), str(out), "-", str(limit)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines(out)  # whole JSON lines, or this raises
    assert subprocess.run([sys.executable, str(driver), str(job), str(out)], cwd=ROOT).returncode == 0
    assert_complete_latest(job, out)


@pytest.mark.parametrize("where", ["file", "under a file", "/dev/null", "empty"])
def test_an_output_folder_that_cannot_be_one_is_exit_2_in_one_line(tmp_path, where):
    job = write_job(tmp_path, "name: x\nprompt: a\n")
    (tmp_path / "afile").write_text("x")
    output = {"file": "afile", "under a file": "afile/sub", "/dev/null": "/dev/null", "empty": ""}[where]
    result = subprocess.run(
        [sys.executable, "-m", "sdbatch", "run", str(job), "-o", output], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "outputs").exists() and (tmp_path / "afile").read_text() == "x"


def test_names_at_the_file_name_limit_still_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path, f"name: n\nprompt: {'é' * 300}\nseed: [1, 2]\nfilename: '{{prompt}}{{seed}}'\n")
    assert run(job, tmp_path / "out").exit_code == 0
    assert_complete(job, tmp_path / "out")


def test_a_name_near_the_limit_still_gets_a_temp_file_that_fits(tmp_path, monkeypatch):
    """The temp name adds `.`, `.tmp-`, the host and the pid: for a long name it is shortened (and
    keeps a hash of the whole name), so writing never fails with 'File name too long'."""
    monkeypatch.setattr("socket.gethostname", lambda: "h" * 64)  # hosts can have 64-byte names
    for name in ("a" * 251 + ".png", "é" * 125 + ".png"):
        write_atomic(tmp_path / name, b"x")
        assert (tmp_path / name).read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a" * 251 + ".png", "é" * 125 + ".png"])


def test_a_sheets_temp_file_left_by_a_killed_run_is_removed(tmp_path, monkeypatch):
    """A run killed while writing a contact sheet leaves `sheets/.name.png.tmp-<host>-<pid>`; the next
    run (or `sdbatch sheets`) removes it, as it removes the image temp files of the folder itself."""
    import socket

    monkeypatch.chdir(tmp_path)
    job, out = write_job(tmp_path, "name: s\nprompt: [a, b]\nseed: 1-2\n"), tmp_path / "out"
    assert run(job, out).exit_code == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / "sheets" / f".run0.png.tmp-{socket.gethostname()}-{int(dead.stdout)}"
    stale.write_bytes(b"half a sheet")
    assert run(job, out).exit_code == 0
    assert not stale.exists()
    assert [p.name for p in (out / "sheets").iterdir() if ".tmp-" in p.name] == []
