"""Run a job: lock the output folder, skip what is done, render the rest in batches, write each
image and its manifest line as soon as it exists, build contact sheets, and say how it went.

Exit codes are `sdbatch.errors`'s: 0 all done, 1 some images failed, 2 bad input, 75 the output
folder is locked by another run, 130 interrupted (the images in flight were finished and written).

Resume relies on the folder, checked (sdbatch.plan): images whose manifest line is there and whose
file is whole are done; images on disk that carry a task's id but have no line (a kill between
rename and line) are adopted with a new line; anything else in the way of a name is moved to
`aside/`, never overwritten. Nothing is written through a symbolic link.
"""

import errno
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, InputError, Interrupts
from .files import clean_temp_files, no_link, own_path, prepare_folder, read_record, write_atomic
from .hires import auto_vae_tile
from .jobs import Job, Task, draw_randoms
from .output.manifest import (
    Manifest,
    finished,
    manifest_name,
    output_lock,
    read_manifests,
    run_lock,
)
from .output.png import png_bytes
from .output.sheets import JOB_RECORD, SHEETS, make_sheets
from .plan import RANDOMS, JobPlan, ModelInfo, check_job_addons, job_model, plan_job
from .render import auto_batch_size, inline_executor, make_executor, parse_devices
from .render.devices import device_counts

WRITERS = 4  # threads encoding and writing PNGs
WRITE_BACKLOG = 256  # images rendered but not yet written, at most
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}  # no point writing more
ASIDE = "aside"  # where files in the way of a job's images are moved (never overwritten)


@dataclass
class Options:
    output: Path | None = None
    device: str = "auto"
    batch_size: int | None = None
    dry_run: bool = False
    sheets: bool = True
    shard: tuple[int, int] | None = None  # (i, n): this run renders tasks with index % n == i
    backend: str = "local"  # or "ray"
    ray_address: str | None = None
    tuning: Any = None  # pipeline.Tuning: compile, channels_last, vae_batch, low_vram, vae_tile


@dataclass
class Summary:
    job: str
    output: Path
    total: int = 0
    skipped: int = 0
    rendered: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (task id, why)
    seconds: float = 0.0
    interrupted: bool = False
    dry_run: bool = False
    sheets: list[Path] = field(default_factory=list)
    adopted: int = 0  # images found on disk without a manifest line, recorded instead of rendered
    merged: int = 0  # combinations of the job that were the same task as another
    stopped: str | None = None  # why the run stopped early (the disk is full, say)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed or self.stopped else EXIT_OK


class Reporter:
    """Told about every step of a run; the CLI picks a rich, plain, JSON or quiet one."""

    def start(self, job: Job, total: int, todo: int, output: Path) -> None: ...
    def image(self, task: Task, file: str | None, error: str | None, done: int, todo: int, rate: float) -> None: ...
    def note(self, message: str) -> None: ...
    def end(self, summary: Summary) -> None: ...
    def close(self) -> None: ...


def entry_for(task: Task, file: str | None, job: Job, status: str, **extra: Any) -> dict:
    """A manifest line: the task's recipe, where its image is, and how it went."""
    return {
        "id": task.id,
        "file": file,
        "status": status,
        **task.recipe.to_record(),
        **({"addons": task.addons.record()} if task.addons else {}),
        **({"vae_tile": tile} if (tile := auto_vae_tile(task.recipe.output_size)) else {}),
        **({"sources": _sources(task)} if task.sources else {}),
        "index": task.index,
        "run": task.run,
        "job": job.name,
        **extra,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _sources(task: Task) -> dict[str, dict[str, str]]:
    """The input files a task read, with the sha256 its id was made from: {field: {path, sha256}}."""
    return {name: {"path": getattr(task.recipe, name), "sha256": sha} for name, sha in task.sources}


def png_text(task: Task, file: str, job: Job, model: ModelInfo) -> dict[str, str]:
    """The two text chunks of an image: A1111's infotext, and our JSON with the whole record."""
    meta = {"job": job.name, "version": __version__, "model": model.record(), "task": entry_for(task, file, job, "ok")}
    return {
        "parameters": task.recipe.to_a1111(model.a1111(), __version__, task.addons.a1111()),
        "sdbatch": json.dumps(meta, ensure_ascii=False),
    }


class Interrupt:
    """Ctrl-C and SIGTERM (alike: systemd and SLURM send SIGTERM, often to the whole process group)
    while rendering: the first finishes and writes the batch in flight, then stops; a second stops
    now. Before rendering starts (locking, planning, loading the model) there is nothing in flight:
    the first one stops at once. Either way what is written is whole and the exit code is 130."""

    def __init__(self) -> None:
        self.requested = False
        self.rendering = False

    @contextmanager
    def installed(self) -> Iterator["Interrupt"]:
        def handler(signum, frame):
            if self.requested or not self.rendering:
                self.requested = True
                raise KeyboardInterrupt
            self.requested = True

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if Interrupts.seen:  # one came before, and its KeyboardInterrupt was lost (see Interrupts)
                self.requested = True
                raise KeyboardInterrupt
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def run_job(job: Job, options: Options, reporter: Reporter, render: Callable | None = None) -> Summary:
    """Render every task of the job (or of its shard) not already in its output folder. `render`
    (tests) replaces loading the model: it takes a list of Tasks and returns (image, error) pairs."""
    folder = Path(options.output) if options.output is not None else job.output
    if options.shard is not None and not (0 <= options.shard[0] < options.shard[1]):
        raise InputError(f"--shard {options.shard[0]}/{options.shard[1]}: i must be in 0..n-1")
    model = job_model(job)  # a bad model is bad input: say so before creating anything
    check_job_addons(job, model)  # so are LoRA and embedding files
    if render is None:  # and the devices (their syntax; a GPU that is not there, without a dry run)
        devices = options.device if options.device != "auto" else job.devices
        (device_counts if options.dry_run else parse_devices)(devices)
    if options.dry_run:
        plan = plan_job(job, folder, shard=options.shard, model=model)
        summary = _summary(plan, dry_run=True)
        reporter.start(plan.job, len(plan.tasks), len(plan.todo), folder)
        reporter.end(summary)
        return summary
    prepare_folder(folder)
    interrupt = Interrupt()
    with interrupt.installed(), run_lock(folder, options.shard):
        for name in (manifest_name(options.shard), JOB_RECORD, RANDOMS, SHEETS, ASIDE):
            own_path(folder / name, folder=name in (SHEETS, ASIDE))
        clean_temp_files(folder)
        plan = plan_job(job, folder, _settle_randoms(folder, job), options.shard, model)
        _record_job(plan)
        summary = _summary(plan)
        _tidy(plan, Manifest(folder, manifest_name(options.shard)), reporter, summary)
        todo = plan.todo
        reporter.start(job, len(plan.tasks), len(todo), folder)
        for note in job.notes:
            reporter.note(note)
        if todo:
            _render_all(plan, todo, options, reporter, summary, render, interrupt)
        if options.sheets and not summary.interrupted and not summary.stopped and _all_done(plan):
            summary.sheets = make_sheets(folder, job.name)
    reporter.end(summary)
    return summary


def _summary(plan: JobPlan, dry_run: bool = False) -> Summary:
    return Summary(
        plan.job.name,
        plan.output,
        total=len(plan.tasks),
        skipped=len(plan.done) + len(plan.found),
        dry_run=dry_run,
        adopted=len(plan.found),
        merged=plan.merged,
    )


def _tidy(plan: JobPlan, manifest: Manifest, reporter: Reporter, summary: Summary) -> None:
    """Before rendering: move what is in the way of this run's names to `aside/`, and record the
    images already on disk that carry a task's id but no manifest line (not rendered again)."""
    if plan.merged:
        reporter.note(f"{plan.merged} combinations of the job were the same task as another; each renders once")
    for name in plan.aside.values():
        moved = _move_aside(plan.output, name)
        reporter.note(f"{name} was in the way (damaged, or not this task's image): moved to {moved}")
    by_id = {t.id: t for t in plan.tasks}
    for task_id, name in plan.found.items():
        size = os.lstat(plan.output / name).st_size
        # the task's line as this plan has it: its recipe is the image's (the id is the recipe's), its
        # index and run today's (the job may have been edited since: sheets group by run)
        manifest.append(entry_for(by_id[task_id], name, plan.job, "ok", model_hash=plan.model.hash, bytes=size))
    if plan.found:
        reporter.note(f"{len(plan.found)} images were on disk without their manifest line: recorded, not rendered")


def _move_aside(folder: Path, name: str) -> str:
    """Rename `folder/name` (a file, a link or a folder) into `aside/` under a free name."""
    aside = no_link(folder / ASIDE)
    aside.mkdir(exist_ok=True)
    stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
    for n in range(1, 10_000):
        target = aside / (name if n == 1 else f"{stem}-{n}{dot}{ext}")
        if not os.path.lexists(target):
            os.rename(folder / name, target)
            return f"{ASIDE}/{target.name}"
    raise InputError(f"{aside}: too many files set aside; empty it")


def _settle_randoms(folder: Path, job: Job) -> dict[str, list[int]]:
    """The seeds of `seed: random`: those recorded in the folder, else drawn now and recorded,
    under a lock so that shards starting together all use the first shard's draw."""
    slots = job.random_slots()
    with output_lock(folder, ".sdbatch-randoms.lock", wait=True):
        recorded = read_record(folder / RANDOMS)
        randoms = draw_randoms(slots, recorded, str(folder / RANDOMS))
        if randoms != {k: recorded.get(k) for k in randoms}:
            write_atomic(folder / RANDOMS, json.dumps(recorded | randoms, indent=1).encode())
    return randoms


def _record_job(plan: JobPlan) -> None:
    runs = [{"index": r.index, "sheet": r.sheet} for r in plan.job.runs]
    record = {"name": plan.job.name, "file": str(plan.job.file), "model": str(plan.model.path), "runs": runs}
    write_atomic(plan.output / JOB_RECORD, json.dumps(record, indent=1).encode())


def _all_done(plan: JobPlan) -> bool:
    """Every task of the job (all shards) finished: then the contact sheets can be built."""
    done = finished(read_manifests(plan.output), plan.output)
    return all(i in done for i in plan.all_ids)


def _executor(plan: JobPlan, options: Options, render: Callable | None, note: Callable[[str], None]):
    if render is not None:
        return inline_executor(render)
    devices = options.device if options.device != "auto" else plan.job.devices
    vae = str(plan.model.vae) if plan.model.vae is not None else None
    return make_executor(str(plan.model.path), vae, devices, options.backend, options.ray_address, options.tuning, note)


class _Writer:
    """Encodes, writes and logs each finished image on a small thread pool, so the device never
    waits for PNG compression or the disk. An image that cannot be written fails alone; a manifest
    that cannot be appended to (the disk is full) stops the run: `broken` says why."""

    def __init__(self, plan: JobPlan, todo: int, options: Options, reporter: Reporter, summary: Summary):
        self.plan, self.todo, self.reporter, self.summary = plan, todo, reporter, summary
        self.manifest = Manifest(plan.output, manifest_name(options.shard))
        self.pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="sdbatch-write")
        self.pending: list = []
        self.lock = threading.Lock()
        self.done = 0
        self.broken: str | None = None
        self.started = time.perf_counter()

    def submit(self, task: Task, image: Any, error: str | None) -> None:
        self.pending.append(self.pool.submit(self._finish, task, image, error))
        while len(self.pending) > WRITE_BACKLOG:  # memory stays bounded if the disk is slow
            self.pending.pop(0).result()

    def _finish(self, task: Task, image: Any, error: str | None) -> None:
        plan, name = self.plan, self.plan.names[task.id]
        file = None
        try:
            if image is not None:
                try:
                    data = png_bytes(image, png_text(task, name, plan.job, plan.model))
                    write_atomic(plan.output / name, data)
                    file = name
                    _pause_for_tests(name)
                except (OSError, ValueError) as e:  # this image fails; a full disk also stops the run
                    error = f"could not write {name}: {getattr(e, 'strerror', None) or e}"
                    if getattr(e, "errno", None) in DISK_FULL:
                        self.broken = self.broken or error
            if file is not None:
                self.manifest.append(entry_for(task, name, plan.job, "ok", model_hash=plan.model.hash, bytes=len(data)))
            else:
                self.manifest.append(entry_for(task, None, plan.job, "failed", error=error))
        except (OSError, ValueError) as e:  # the manifest cannot grow: stop; the image is adopted next run
            why = f"could not append to {self.manifest.path.name}: {getattr(e, 'strerror', None) or e}"
            self.broken = self.broken or why
            error, file = (error or why), None
        with self.lock:
            if file is not None:
                self.summary.rendered += 1
            else:
                self.summary.failed.append((task.id, f"{name}: {error}"))
            self.done += 1
            rate = self.done / (time.perf_counter() - self.started)
            self.reporter.image(task, file, error, self.done, self.todo, rate)

    def close(self) -> None:
        """Every image already rendered gets written, even when stopping."""
        self.pool.shutdown(wait=True)
        for future in self.pending:
            future.result()


def _pause_for_tests(name: str) -> None:
    """Tests that kill a run between an image's rename and its manifest line set
    SDBATCH_TEST_PAUSE_AFTER_RENAME to a file: the writer says there which image it just renamed
    and waits to be killed, so the kill lands in that window every time, not by luck."""
    marker = os.environ.get("SDBATCH_TEST_PAUSE_AFTER_RENAME")
    if marker:
        with open(marker, "a") as f:
            f.write(name + "\n")
        time.sleep(3600)


def _render_all(
    plan: JobPlan,
    todo: list[Task],
    options: Options,
    reporter: Reporter,
    summary: Summary,
    render: Callable | None,
    interrupt: Interrupt,
) -> None:
    executor = _executor(plan, options, render, reporter.note)
    writer = _Writer(plan, len(todo), options, reporter, summary)  # its clock starts once the model loaded
    interrupt.rendering = True
    try:
        stop = lambda: interrupt.requested or writer.broken is not None  # noqa: E731
        for batch, results in executor.map(_batches(plan, todo, options, executor.device), stop):
            for task, (image, error) in zip(batch, results, strict=True):
                writer.submit(task, image, error)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; what is written is whole
        pass
    finally:
        try:
            writer.close()
        finally:
            executor.close()
            summary.seconds = time.perf_counter() - writer.started
    summary.interrupted = interrupt.requested and writer.done < len(todo)  # stopped, but all was done anyway
    if writer.broken is not None and writer.done < len(todo):
        summary.stopped = f"stopped after {writer.done} of {len(todo)} images: {writer.broken}"


def _batches(plan: JobPlan, todo: list[Task], options: Options, device: str) -> Iterator[list[Task]]:
    """Compatible tasks (one recipe batch key) in batches. Tasks are taken LoRA set by LoRA set, in
    order of each set's first task, so that a worker merges each set once per job rather than
    once per batch; within a set, run by run, in order of each group's first task."""
    by_loras: dict[tuple, list[Task]] = {}
    for task in todo:
        by_loras.setdefault(task.recipe.loras(), []).append(task)
    for tasks in by_loras.values():
        for run in plan.job.runs:
            size = int(options.batch_size or (run.batch_size if run.batch_size != "auto" else auto_batch_size(device)))
            groups: dict[tuple, list[Task]] = {}
            for task in tasks:
                if task.run == run.index:
                    groups.setdefault(task.recipe.batch_key(), []).append(task)
            for group in groups.values():
                for i in range(0, len(group), size):
                    yield group[i : i + size]
