"""A job planned against its model and its output folder: every task with its id and file name,
and what is already done. Reads only; torch-free (the model's facts come from its file header).
"""

import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image

from .addons.library import AddonError, Addons, Folders, Library, check_addons, flat
from .checkpoints import model_hash, model_sha256, open_model, resolve_model
from .errors import InputError
from .files import inside, read_record
from .hires import builtin
from .images import image_sha256
from .jobs import Job, Run, Task, draw_randoms
from .jobs.fields import RandomPrompts
from .jobs.yamlmarks import JobError, Problem
from .models.configs import SDConfig
from .output.manifest import finished, read_manifests, whole_png
from .output.names import file_name
from .recipe import DEFAULTS, Recipe
from .text import printable

RANDOMS = "randoms.json"  # the draws of `seed: random`, kept so that a resumed run uses the same seeds


@dataclass
class ModelInfo:
    """The facts about a job's model, computed once and carried through plan, run and rerun."""

    path: Path
    vae: Path | None
    config: SDConfig
    defaults: dict[str, Any] = field(default_factory=dict)  # what its maker recommends, e.g. cfg

    @classmethod
    def of(cls, model: str | Path, vae: str | Path | None = None) -> "ModelInfo":
        """Resolve a model name or path and read its config from the header (no weights loaded)."""
        path = resolve_model(model)
        source = open_model(path)  # one read of the header for both
        return cls(path, Path(vae) if vae is not None else None, source.config(), source.defaults())

    @cached_property
    def sha256(self) -> str:
        return model_sha256(self.path)

    @cached_property
    def vae_sha256(self) -> str | None:
        return model_sha256(self.vae) if self.vae is not None else None

    @property
    def id(self) -> str:
        """What task ids depend on: the weights (and the VAE's, when another is given)."""
        return self.sha256 + (f"+vae:{self.vae_sha256}" if self.vae is not None else "")

    @cached_property
    def hash(self) -> str:
        """A1111's short `Model hash`."""
        return model_hash(self.path)

    @property
    def name(self) -> str:
        """What A1111 writes as `Model`: the file's stem (the folder name for `weights/demo/model...`)."""
        if self.path.name == "model.safetensors":
            return self.path.parent.name
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def size(self) -> int:
        return self.config.sample_size

    @property
    def cfg(self) -> float:
        return float(self.defaults.get("cfg", DEFAULTS["cfg"]))

    def record(self) -> dict[str, str]:
        """The model in our PNG chunk."""
        return {"name": self.name, "path": str(self.path), "hash": self.hash, "sha256": self.sha256}

    def a1111(self) -> dict[str, str]:
        return {"Model hash": self.hash, "Model": self.name}


def job_model(job: Job) -> ModelInfo:
    """The job's model, or InputError saying where in the job file it was named (the checkpoint's
    own message says what is wrong with it)."""
    try:
        return ModelInfo.of(job.model, job.vae)
    except InputError as e:
        line = f":{job.model_line}" if job.model_line else ""
        raise InputError(f"{printable(str(job.file))}{line}: model: {e}") from None


@dataclass
class JobPlan:
    job: Job
    model: ModelInfo
    output: Path
    tasks: list[Task]
    done: dict[str, dict]  # id -> manifest entry (checked: its file is there and whole)
    names: dict[str, str]  # id -> file name
    randoms: dict[str, list[int]]
    all_ids: list[str]  # every task of the job, whatever the shard
    found: dict[str, str] = field(default_factory=dict)  # id -> its image on disk that has no manifest line
    aside: dict[str, str] = field(default_factory=dict)  # id -> a file in the way of its name: moved aside
    merged: int = 0  # tasks of the job that were the same task (same id) as an earlier one

    @property
    def todo(self) -> list[Task]:
        return [t for t in self.tasks if t.id not in self.done and t.id not in self.found]


def expand_tasks(job: Job, model: ModelInfo, randoms: dict[str, list[int]]) -> list[Task]:
    """Every distinct task of the job, with ids from the recipe, the model and the images'
    contents. A combination that is the same task as an earlier one (`seed: [1, 1]`, `cfg: [4,
    4.0]`, a sampler and its alias, strength swept without an init image) is merged into it: one
    id is one render, one file, one manifest line. Indices stay those of the job's product."""
    return _distinct_tasks(job, model, randoms)[0]


def _distinct_tasks(job: Job, model: ModelInfo, randoms: dict[str, list[int]]) -> tuple[list[Task], int]:
    """The job's distinct tasks, and how many combinations were merged into an earlier one."""
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        if path not in digests:
            digests[path] = image_sha256(path)  # read once: at validate time, when the image was checked
        return digests[path]

    tasks: dict[str, Task] = {}
    combos = job.expand(randoms, model.size, model.cfg)
    library = addon_library(job, model)
    problems: dict[Problem, None] = {}
    for i, (run, recipe) in enumerate(combos):
        addons = _addons(library, job.runs[run], recipe, model, problems)
        if addons is not None:
            task_id = recipe.task_id(model.id, digest, addons.id_data())
            sources = tuple((f, digests[p]) for f in ("init_image", "mask") if (p := getattr(recipe, f)) is not None)
            tasks.setdefault(task_id, Task(i, run, task_id, recipe, addons, sources))
    if problems:
        raise JobError(list(problems))
    return list(tasks.values()), len(combos) - len(tasks)


def check_job_addons(job: Job, model: ModelInfo) -> None:
    """Every LoRA and embedding the job can use, found and checked against the model without
    expanding the job (what `validate` adds to the rules): JobError naming the lines."""
    library = addon_library(job, model)
    problems: dict[Problem, None] = {}

    def texts(run: Run, name: str) -> list[str]:
        return [c for v in run.values[name] for c in (v.choices if isinstance(v, RandomPrompts) else [v])]

    for run in job.runs:
        for lora, prompt, negative in itertools.product(
            run.values["lora"], texts(run, "prompt"), texts(run, "negative")
        ):
            _addons(library, run, Recipe(prompt=prompt, negative=negative, lora=lora), model, problems)
        for name in dict.fromkeys(n for n in run.values.get("hires_upscaler", []) if not builtin(n)):
            try:
                check_addons(Addons(upscaler=library.upscaler(name)), model.config)
            except AddonError as e:
                problems[_addon_problem(run, Recipe(), e)] = None
    if problems:
        raise JobError(list(problems))


def addon_library(job: Job | None, model: ModelInfo) -> Library:
    """The job's add-on folders (the default ones without a job), matching embeddings with the
    model's own tokenizer (loaded only when an embedding's name appears in a prompt)."""
    folders = (
        Folders.of(job.lora_folder, job.embedding_folder, job.upscaler_folder) if job is not None else Folders.of()
    )

    def tokenizer() -> Callable[[str], list[int]]:
        from .tokenizer import load_tokenizer

        return load_tokenizer(model.path, vocab_size=model.config.clip.vocab_size).tokens

    return Library(folders, tokenize=tokenizer)


def _addons(library: Library, run: Run, recipe: Recipe, model: ModelInfo, problems: dict) -> Addons | None:
    """The recipe's add-ons, found and checked; None after noting the problem with its line."""
    try:
        addons = recipe_addons(library, recipe)
        check_addons(addons, model.config)
        return addons
    except AddonError as e:
        problems[_addon_problem(run, recipe, e)] = None
        return None


def recipe_addons(library: Library, recipe: Recipe) -> Addons:
    """The add-on files a recipe uses: its LoRAs, the embeddings its prompts trigger (the hires
    prompts' too), and the upscaler model of its hires fix (not a latent or pixel mode)."""
    addons = library.addons(recipe.loras(), recipe.prompt, recipe.negative, recipe.steps, recipe.emphasis)
    if not recipe.hires:
        return addons
    second = recipe.second_pass()
    more = library.addons((), second.prompt, second.negative, second.steps, second.emphasis).embeddings
    upscaler = None if builtin(recipe.hires_upscaler) else library.upscaler(recipe.hires_upscaler)
    return replace(addons, embeddings=tuple(dict.fromkeys(addons.embeddings + more)), upscaler=upscaler)


def _addon_problem(run: Run, recipe: Recipe, error: AddonError) -> Problem:
    """Where in the job file a LoRA or embedding problem comes from: the `lora` key when it names
    the LoRA, else the prompt (its tags, or an embedding's name), else the negative prompt."""
    if error.kind == "lora":
        field = "lora" if any(name == error.name for name, _, _ in recipe.lora) else "prompt"
    elif error.kind == "upscaler":
        field = "hires_upscaler"
    else:  # an embedding: the first text that names it
        texts = [(n, getattr(recipe, n)) for n in ("prompt", "hires_prompt", "negative", "hires_negative")]
        field = next((n for n, text in texts if text and flat(error.name) in flat(text)), "negative")
    source = run.sources.get(field) or run.sources["prompt"]
    return Problem(source.file, source.line, source.field, str(error))


def plan_job(
    job: Job,
    output: Path | None = None,
    randoms: dict[str, list[int]] | None = None,
    shard: tuple[int, int] | None = None,
    model: ModelInfo | None = None,
) -> JobPlan:
    """Expand the job against its model and what its output folder already holds (reads only).
    With `shard=(i, n)` the plan keeps the tasks whose index is i modulo n; names and ids are
    those of the whole job, so the shards of one job fill one folder without clashing."""
    model = model or job_model(job)
    folder = Path(output) if output is not None else job.output
    if os.path.lexists(folder) and not folder.is_dir():
        raise InputError(f"output {folder}: is a file, not a folder; name a folder for the images")
    recorded = randoms if randoms is not None else read_record(folder / RANDOMS)
    randoms = draw_randoms(job.random_slots(), recorded, str(folder / RANDOMS))
    tasks, merged = _distinct_tasks(job, model, randoms)
    all_ids = [t.id for t in tasks]
    if shard is not None:
        tasks = [t for t in tasks if t.index % shard[1] == shard[0]]
    entries = read_manifests(folder) if folder.is_dir() else []
    finished_all = finished(entries, folder)
    ids = {t.id for t in tasks}
    done = {k: v for k, v in finished_all.items() if k in ids}
    names, found, aside = _place(job, tasks, done, folder, finished_all)
    return JobPlan(job, model, folder, tasks, done, names, randoms, all_ids, found, aside, merged)


def _place(
    job: Job, tasks: list[Task], done: dict[str, dict], folder: Path, finished_all: dict[str, dict]
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Where each task's image goes, which images are already on disk without a manifest line
    (a kill between an image's rename and its line, a lost manifest), and which files are in
    the way. A name is the template's; a name two tasks of the job share gets the task id
    appended; so does a name whose file is another task's finished image. A file at a task's name
    that carries the task's id (and decodes) is that task's image: adopted, never rendered twice.
    Any other file there (damaged, foreign, a link) is moved aside before the task renders."""
    base = {t.id: file_name(job.filename, t) for t in tasks}
    counts: dict[str, int] = {}
    for name in base.values():
        counts[name] = counts.get(name, 0) + 1
    taken = {e["file"]: i for i, e in finished_all.items()}
    # an image a run renamed into place but never recorded (killed in between), under any name: the
    # job may have been edited since, and its names with it ({index} shifts when seeds are added)
    orphans = _orphans(folder, set(taken), {t.id for t in tasks if t.id not in done})
    taken |= {name: task_id for task_id, name in orphans.items()}
    names, found, aside = {}, {}, {}
    for t in tasks:
        if t.id in done:
            names[t.id] = done[t.id]["file"]
            continue
        if t.id in orphans:
            names[t.id] = found[t.id] = orphans[t.id]
            continue
        name = base[t.id] if counts[base[t.id]] == 1 else _with_id(base[t.id], t.id)
        candidates = [c for c in (name, _with_id(name, t.id), _with_id(name, t.id, 64)) if taken.get(c, t.id) == t.id]
        candidates = list(dict.fromkeys(candidates))
        mine = next((c for c in candidates if _owner(folder, c) == t.id), None)
        if mine is not None:
            names[t.id] = found[t.id] = mine
            continue
        names[t.id] = candidates[0]
        path = inside(folder, candidates[0])
        if path is None or os.path.lexists(path):
            aside[t.id] = candidates[0]
    return names, found, aside


def _with_id(name: str, task_id: str, chars: int = 8) -> str:
    suffix = f"-{task_id[:chars]}"
    stem = name[: -len(".png")]
    return name if stem.endswith(suffix) else f"{stem}{suffix}.png"


def _orphans(folder: Path, recorded: set[str], pending: set[str]) -> dict[str, str]:
    """{task id: file name} of the whole PNGs in the folder that no manifest line records and that
    carry the id of a task still to render (the first by name where two do)."""
    if not pending or not folder.is_dir():
        return {}
    found: dict[str, str] = {}
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.name.endswith(".png") and e.is_file(follow_symlinks=False))
    for name in names:
        if name in recorded or _claimed_id(folder / name) not in pending:  # a header read: cheap
            continue
        owner = _owner(folder, name)  # the whole image decodes: it is that task's
        if owner in pending and owner not in found:
            found[owner] = name
    return found


def _claimed_id(path: Path) -> str | None:
    """The task id an image's `sdbatch` chunk names, read from the PNG's header chunks only (sdbatch
    writes its text before the pixels); None if there is none. Nothing is decoded or trusted here."""
    if not whole_png(path):
        return None
    try:
        with Image.open(path) as im:
            task = json.loads(im.info.get("sdbatch", "{}")).get("task")
    except Exception:
        return None
    return task.get("id") if isinstance(task, dict) and isinstance(task.get("id"), str) else None


def _owner(folder: Path, name: str) -> str | None:
    """The task id an image on disk carries in its `sdbatch` chunk, when it is a whole PNG that
    decodes; None for anything else (missing, damaged, foreign, a link)."""
    path = inside(folder, name)
    if path is None or not whole_png(path):
        return None
    try:
        with Image.open(path) as im:
            im.load()
            meta = json.loads(im.text.get("sdbatch", "{}"))  # type: ignore[attr-defined]
        task_id = meta["task"]["id"]
    except Exception:
        return None
    return task_id if isinstance(task_id, str) else None
