"""Run a job: lock the output folder, skip what is done, render the rest in batches, write each
image and its manifest line as soon as it exists, build contact sheets, and say how it went.

Exit codes are `sdbatch.errors`'s: 0 all done, 1 some images failed, 2 bad input, 75 the output
folder is locked by another run, 130 interrupted (the images in flight were finished and written).
"""

import json
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
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, InputError
from .files import clean_temp_files, write_atomic
from .jobs import Job, Task, draw_randoms
from .output.manifest import Manifest, finished, lock_name, manifest_name, output_lock, read_manifests
from .output.png import png_bytes
from .output.sheets import JOB_RECORD, make_sheets
from .plan import RANDOMS, JobPlan, ModelInfo, plan_job, read_json
from .render import auto_batch_size, inline_executor, make_executor

WRITERS = 4  # threads encoding and writing PNGs
WRITE_BACKLOG = 256  # images rendered but not yet written, at most


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

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed else EXIT_OK


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
        "index": task.index,
        "run": task.run,
        "job": job.name,
        **extra,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def png_text(task: Task, file: str, job: Job, model: ModelInfo) -> dict[str, str]:
    """The two text chunks of an image: A1111's infotext, and our JSON with the whole record."""
    meta = {"job": job.name, "version": __version__, "model": model.record(), "task": entry_for(task, file, job, "ok")}
    return {
        "parameters": task.recipe.to_a1111(model.a1111(), __version__),
        "sdbatch": json.dumps(meta, ensure_ascii=False),
    }


class Interrupt:
    """First Ctrl-C (or SIGTERM): finish and write the batch in flight, then stop. Second: stop now."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator["Interrupt"]:
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
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
    model = ModelInfo.of(job.model, job.vae)  # a bad model is bad input: say so before creating anything
    if options.dry_run:
        plan = plan_job(job, folder, shard=options.shard, model=model)
        summary = Summary(job.name, folder, total=len(plan.tasks), skipped=len(plan.done), dry_run=True)
        reporter.start(plan.job, len(plan.tasks), len(plan.todo), folder)
        reporter.end(summary)
        return summary
    with output_lock(folder, lock_name(options.shard)):
        clean_temp_files(folder)
        plan = plan_job(job, folder, _settle_randoms(folder, job), options.shard, model)
        _record_job(plan)
        summary = Summary(job.name, folder, total=len(plan.tasks), skipped=len(plan.done))
        todo = plan.todo
        reporter.start(job, len(plan.tasks), len(todo), folder)
        if todo:
            _render_all(plan, todo, options, reporter, summary, render)
        if options.sheets and not summary.interrupted and _all_done(plan):
            summary.sheets = make_sheets(folder, job.name)
    reporter.end(summary)
    return summary


def _settle_randoms(folder: Path, job: Job) -> dict[str, list[int]]:
    """The seeds of `seed: random`: those recorded in the folder, else drawn now and recorded,
    under a lock so that shards starting together all use the first shard's draw."""
    slots = job.random_slots()
    with output_lock(folder, ".sdbatch-randoms.lock", wait=True):
        recorded = read_json(folder / RANDOMS)
        randoms = draw_randoms(slots, recorded)
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
    waits for PNG compression or the disk; an image that cannot be written fails alone."""

    def __init__(self, plan: JobPlan, todo: int, options: Options, reporter: Reporter, summary: Summary):
        self.plan, self.todo, self.reporter, self.summary = plan, todo, reporter, summary
        self.manifest = Manifest(plan.output, manifest_name(options.shard))
        self.pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="sdbatch-write")
        self.pending: list = []
        self.lock = threading.Lock()
        self.done = 0
        self.started = time.perf_counter()

    def submit(self, task: Task, image: Any, error: str | None) -> None:
        self.pending.append(self.pool.submit(self._finish, task, image, error))
        while len(self.pending) > WRITE_BACKLOG:  # memory stays bounded if the disk is slow
            self.pending.pop(0).result()

    def _finish(self, task: Task, image: Any, error: str | None) -> None:
        plan, name = self.plan, self.plan.names[task.id]
        if image is not None:
            try:
                write_atomic(plan.output / name, png_bytes(image, png_text(task, name, plan.job, plan.model)))
                self.manifest.append(entry_for(task, name, plan.job, "ok", model_hash=plan.model.hash))
            except OSError as e:  # disk full, permissions: this image fails, the run goes on
                image, error = None, f"could not write {name}: {e}"
        if image is None:
            self.manifest.append(entry_for(task, None, plan.job, "failed", error=error))
        with self.lock:
            if image is not None:
                self.summary.rendered += 1
            else:
                self.summary.failed.append((task.id, f"{name}: {error}"))
            self.done += 1
            rate = self.done / (time.perf_counter() - self.started)
            self.reporter.image(task, name if image is not None else None, error, self.done, self.todo, rate)

    def close(self) -> None:
        """Every image already rendered gets written, even when stopping."""
        self.pool.shutdown(wait=True)
        for future in self.pending:
            future.result()


def _render_all(plan: JobPlan, todo: list[Task], options, reporter: Reporter, summary: Summary, render) -> None:
    executor = _executor(plan, options, render, reporter.note)
    writer = _Writer(plan, len(todo), options, reporter, summary)  # its clock starts once the model loaded
    try:
        with Interrupt().installed() as interrupt:
            for batch, results in executor.map(
                _batches(plan, todo, options, executor.device), lambda: interrupt.requested
            ):
                for task, (image, error) in zip(batch, results, strict=True):
                    writer.submit(task, image, error)
            summary.interrupted = interrupt.requested
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; what is written is whole
        summary.interrupted = True
    finally:
        writer.close()
        executor.close()
        summary.seconds = time.perf_counter() - writer.started
    summary.interrupted = summary.interrupted and writer.done < len(todo)  # stopped, but all was done anyway


def _batches(plan: JobPlan, todo: list[Task], options: Options, device: str) -> Iterator[list[Task]]:
    """Compatible tasks of each run (one recipe batch key) in batches, in order of each group's
    first task."""
    for run in plan.job.runs:
        size = int(options.batch_size or (run.batch_size if run.batch_size != "auto" else auto_batch_size(device)))
        groups: dict[tuple, list[Task]] = {}
        for task in todo:
            if task.run == run.index:
                groups.setdefault(task.recipe.batch_key(), []).append(task)
        for group in groups.values():
            for i in range(0, len(group), size):
                yield group[i : i + size]
