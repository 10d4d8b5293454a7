"""Run a job: lock the output folder, skip what is done, render the rest in batches, write each
image and its manifest line as soon as it exists, build contact sheets, and say how it went.

Exit codes (see `exit_code`): 0 all done, 1 some images failed, 2 bad input, 75 the output folder
is locked by another run, 130 interrupted (the images in flight were finished and written first).
"""

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
from .errors import InputError
from .jobs import Job, Task, iter_batches, with_model_defaults
from .output import (
    MANIFEST,
    Manifest,
    a1111_parameters,
    build_sheets,
    clean_temp_files,
    file_name,
    finished,
    output_lock,
    png_bytes,
    read_manifests,
    write_atomic,
)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 75, 130
RANDOMS = "randoms.json"  # the draws of `seed: random`, kept so that a resumed run uses the same seeds
JOB_RECORD = "job.json"
WRITERS = 4  # threads encoding and writing PNGs
WRITE_BACKLOG = (
    256  # images rendered but not yet written, at most  # what `sdbatch sheets` needs to rebuild the contact sheets
)


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
    fast: Any = None  # pipeline.FastPath: compile, channels_last, vae_batch, low_vram


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


@dataclass
class Plan:
    job: Job
    model_path: Path
    output: Path
    tasks: list[Task]
    done: dict[str, dict]  # id -> manifest entry
    names: dict[str, str]  # id -> file name
    randoms: dict[str, list[int]]
    all_ids: list[str]  # every task of the job, whatever the shard

    @property
    def todo(self) -> list[Task]:
        return [t for t in self.tasks if t.id not in self.done]


def resolve_device(device: str) -> str:
    """The first device of a --devices value (`auto`: the first GPU, else the CPU)."""
    from .devices import parse_devices

    return parse_devices(device)[0]


def auto_batch_size(device: str) -> int:
    """Batches large enough to keep the device busy without running out of memory."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return max(1, min(16, int(free / 2**30 / 2.5)))  # ~2.5 GiB per SD1.5 image at 512^2 in fp16
    return 8


def plan_job(
    job: Job,
    output: Path | None = None,
    randoms: dict[str, list[int]] | None = None,
    shard: tuple[int, int] | None = None,
) -> Plan:
    """Expand the job against its model and what its output folder already holds (reads only).
    With `shard=(i, n)` the plan keeps the tasks whose index is i modulo n; names and ids are
    those of the whole job, so the shards of one job fill one folder without clashing."""
    from .checkpoint import model_config, model_defaults, model_sha256, resolve_model
    from .jobs import DEFAULT_CFG, draw_randoms

    model_path = resolve_model(job.model)
    config = model_config(model_path)
    job = with_model_defaults(job, config.sample_size, model_defaults(model_path).get("cfg", DEFAULT_CFG))
    folder = Path(output) if output is not None else job.output
    recorded = randoms if randoms is not None else _read_json(folder / RANDOMS)
    randoms = draw_randoms(job.random_slots(), recorded)
    model_id = model_sha256(model_path) + (f"+vae:{model_sha256(job.vae)}" if job.vae else "")
    tasks = job.expand(model_id, randoms)
    entries = read_manifests(folder) if folder.is_dir() else []
    ids = {t.id for t in tasks}
    done = {k: v for k, v in finished(entries, folder).items() if k in ids}
    names = _names(job, tasks, done, folder, entries)
    all_ids = [t.id for t in tasks]
    if shard is not None:
        tasks = [t for t in tasks if t.index % shard[1] == shard[0]]
        done = {k: v for k, v in done.items() if k in {t.id for t in tasks}}
    return Plan(job, model_path, folder, tasks, done, names, randoms, all_ids)


def _names(job: Job, tasks: list[Task], done: dict[str, dict], folder: Path, entries: list[dict]) -> dict[str, str]:
    """File names from the template; a name two tasks share, or one a file of another task already
    has on disk, gets the task id appended so that no image ever overwrites another."""
    names = {t.id: file_name(job.filename, t) for t in tasks}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    taken = {e["file"] for e in entries if isinstance(e.get("file"), str)}
    for t in tasks:
        if t.id in done:
            names[t.id] = done[t.id]["file"]
            continue
        name = names[t.id]
        if counts[name] > 1 or name in taken or (folder / name).exists():
            names[t.id] = name[: -len(".png")] + f"-{t.id[:8]}.png"
    return names


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def entry_for(task: Task, file: str | None, job: Job, status: str, **extra: Any) -> dict:
    """A manifest line: the task, where its image is, and how it went."""
    return {
        "id": task.id,
        "file": file,
        "status": status,
        "prompt": task.prompt,
        "negative": task.negative,
        "seed": task.seed,
        "steps": task.steps,
        "sampler": task.sampler,
        "karras": task.karras,
        "cfg": task.cfg,
        "strength": task.strength,
        "size": [task.width, task.height],
        "init_image": task.init_image,
        "mask": task.mask,
        "index": task.index,
        "run": task.run,
        "job": job.name,
        **extra,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
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
    if options.dry_run:
        plan = plan_job(job, folder, shard=options.shard)
        summary = Summary(job.name, folder, total=len(plan.tasks), skipped=len(plan.done), dry_run=True)
        reporter.start(plan.job, len(plan.tasks), len(plan.todo), folder)
        reporter.end(summary)
        return summary
    if options.shard is not None and not (0 <= options.shard[0] < options.shard[1]):
        raise InputError(f"--shard {options.shard[0]}/{options.shard[1]}: i must be in 0..n-1")
    from .checkpoint import model_config, resolve_model

    model_config(resolve_model(job.model))  # a bad model is bad input: say so before creating anything
    with output_lock(folder, _lock_name(options.shard)):
        clean_temp_files(folder)
        plan = plan_job(job, folder, _settle_randoms(folder, job), options.shard)
        job = plan.job
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


def _lock_name(shard: tuple[int, int] | None) -> str:
    return ".sdbatch.lock" if shard is None else f".sdbatch-shard-{shard[0]}-of-{shard[1]}.lock"


def _settle_randoms(folder: Path, job: Job) -> dict[str, list[int]]:
    """The seeds of `seed: random`: those recorded in the folder, else drawn now and recorded,
    under a lock so that shards starting together all use the first shard's draw."""
    from .jobs import draw_randoms

    slots = job.random_slots()
    with output_lock(folder, ".sdbatch-randoms.lock", wait=True):
        recorded = _read_json(folder / RANDOMS)
        randoms = draw_randoms(slots, recorded)
        if randoms != {k: recorded.get(k) for k in randoms}:
            write_atomic(folder / RANDOMS, json.dumps(recorded | randoms, indent=1).encode())
    return randoms


def _all_done(plan: Plan) -> bool:
    """Every task of the job (all shards) finished: then the contact sheets can be built."""
    done = finished(read_manifests(plan.output), plan.output)
    return all(i in done for i in plan.all_ids)


def _executor(plan: Plan, options: Options, render: Callable | None, note: Callable[[str], None]):
    """Tests pass `render`; otherwise one device renders here, several in worker processes, and
    `--backend ray` on Ray actors."""
    from .devices import LocalExecutor, ModelSpec, ProcessExecutor, build_renderer, parse_devices

    if render is not None:
        return LocalExecutor(render), "cpu"
    devices = parse_devices(options.device if options.device != "auto" else plan.job.devices)
    path, vae = str(plan.model_path), plan.job.vae
    if options.backend == "ray":
        from .raybackend import RayExecutor

        spec = ModelSpec(path, vae, devices[0], fast=options.fast)
        executor = RayExecutor(spec, options.ray_address, cpu_workers=len(devices), note=note)
        return executor, executor.device
    if len(devices) == 1:
        return LocalExecutor(build_renderer(ModelSpec(path, vae, devices[0], fast=options.fast))), devices[0]
    cpu_workers = devices.count("cpu")
    threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
    specs = [ModelSpec(path, vae, d, threads if d == "cpu" else None, options.fast) for d in devices]
    return ProcessExecutor(specs, note), devices[0]


def _render_all(plan, todo, options, reporter, summary, render) -> None:
    """Batches go to the executor; each finished image is encoded, written and logged on a small
    thread pool, so the device never waits for PNG compression or the disk."""
    from .checkpoint import model_hash as short_hash

    job, folder = plan.job, plan.output
    manifest = Manifest(folder, _manifest_name(options.shard))
    model_hash, sha256 = short_hash(plan.model_path), _model_sha(plan.model_path)
    model_name = _model_name(plan.model_path)
    model = {"name": model_name, "path": str(plan.model_path), "hash": model_hash, "sha256": sha256}
    lock = threading.Lock()
    done = 0

    def finish(task: Task, image: Any, error: str | None) -> None:
        nonlocal done
        name = plan.names[task.id]
        if image is not None:
            try:
                meta = {"job": job.name, "version": __version__, "model": model}
                meta["task"] = entry_for(task, name, job, "ok")
                text = {
                    "parameters": a1111_parameters(task, model_hash, model_name, __version__),
                    "sdbatch": json.dumps(meta, ensure_ascii=False),
                }
                write_atomic(folder / name, png_bytes(image, text))
                manifest.append(entry_for(task, name, job, "ok", model_hash=model_hash))
            except OSError as e:  # disk full, permissions: this image fails, the run goes on
                image, error = None, f"could not write {name}: {e}"
        if image is None:
            manifest.append(entry_for(task, None, job, "failed", error=error))
        with lock:
            if image is not None:
                summary.rendered += 1
            else:
                summary.failed.append((task.id, f"{name}: {error}"))
            done += 1
            rate = done / (time.perf_counter() - started)
            reporter.image(task, name if image is not None else None, error, done, len(todo), rate)

    executor, device = _executor(plan, options, render, reporter.note)
    started = time.perf_counter()  # after the model loaded: the rate is rendering, not start-up
    writers = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="sdbatch-write")
    pending: list = []
    try:
        with Interrupt().installed() as interrupt:
            batches = _batches(plan, todo, options, device)
            for batch, results in executor.map(batches, lambda: interrupt.requested):
                for task, (image, error) in zip(batch, results, strict=True):
                    pending.append(writers.submit(finish, task, image, error))
                while len(pending) > WRITE_BACKLOG:  # memory stays bounded if the disk is slow
                    pending.pop(0).result()
            summary.interrupted = interrupt.requested
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; what is written is whole
        summary.interrupted = True
    finally:
        writers.shutdown(wait=True)  # every image already rendered gets written, even when stopping
        for future in pending:
            future.result()
        executor.close()
        summary.seconds = time.perf_counter() - started
    summary.interrupted = summary.interrupted and done < len(todo)  # stopped, but all was done anyway


def _manifest_name(shard: tuple[int, int] | None) -> str:
    return MANIFEST if shard is None else f"manifest-shard-{shard[0]}-of-{shard[1]}.jsonl"


def _model_sha(path: Path) -> str:
    from .checkpoint import model_sha256

    return model_sha256(path)


def _model_name(path: Path) -> str:
    """What A1111 writes as `Model`: the file's stem (the folder name for `weights/demo/model...`)."""
    if path.name == "model.safetensors":
        return path.parent.name
    return path.stem if path.is_file() else path.name


def _batches(plan: Plan, todo: list[Task], options: Options, device: str) -> Iterator[list[Task]]:
    for run in plan.job.runs:
        tasks = [t for t in todo if t.run == run.index]
        size = options.batch_size or (run.batch_size if run.batch_size != "auto" else auto_batch_size(device))
        yield from iter_batches(tasks, int(size))


def request_for(task: Task, init_image: Any = None, mask: Any = None) -> Any:
    """The pipeline Request for a task (init image and mask already opened)."""
    from .pipeline import Request

    return Request(
        prompt=task.prompt,
        negative=task.negative,
        seed=task.seed,
        steps=task.steps,
        sampler=task.sampler,
        karras=task.karras,
        cfg=task.cfg,
        width=task.width,
        height=task.height,
        init_image=init_image,
        mask=mask,
        strength=task.strength if task.strength is not None else 0.75,
    )


def _record_job(plan: Plan) -> None:
    runs = [{"index": r.index, "sheet": r.sheet} for r in plan.job.runs]
    record = {"name": plan.job.name, "file": str(plan.job.file), "model": str(plan.model_path), "runs": runs}
    write_atomic(plan.output / JOB_RECORD, json.dumps(record, indent=1).encode())


def make_sheets(folder: Path, title: str | None = None) -> list[Path]:
    """Contact sheets for every run in the folder's manifests (with the axes its job asked for)."""
    record = _read_json(folder / JOB_RECORD)
    wanted = {r.get("index"): r.get("sheet") or {} for r in record.get("runs", []) if isinstance(r, dict)}
    entries = [e for e in read_manifests(folder) if e.get("status") == "ok"]
    by_run: dict[int, dict[str, dict]] = {}
    for e in entries:
        by_run.setdefault(int(e.get("run", 0)), {})[str(e.get("id"))] = e  # a re-rendered id counts once
    written = []
    for run, items in sorted(by_run.items()):
        name = title or record.get("name") or folder.name
        written.extend(build_sheets(folder, run, list(items.values()), wanted.get(run, {}), f"{name} · run {run}"))
    return written
