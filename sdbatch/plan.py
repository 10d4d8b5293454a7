"""A job planned against its model and its output folder: every task with its id and file name,
and what is already done. Reads only; torch-free (the model's facts come from its file header).
"""

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .checkpoints import model_hash, model_sha256, open_model, resolve_model
from .files import content_sha256
from .jobs import Job, Task, draw_randoms
from .models.configs import SDConfig
from .output.manifest import finished, read_manifests
from .output.names import file_name
from .recipe import DEFAULTS

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


@dataclass
class JobPlan:
    job: Job
    model: ModelInfo
    output: Path
    tasks: list[Task]
    done: dict[str, dict]  # id -> manifest entry
    names: dict[str, str]  # id -> file name
    randoms: dict[str, list[int]]
    all_ids: list[str]  # every task of the job, whatever the shard

    @property
    def todo(self) -> list[Task]:
        return [t for t in self.tasks if t.id not in self.done]


def expand_tasks(job: Job, model: ModelInfo, randoms: dict[str, list[int]]) -> list[Task]:
    """Every task of the job, with ids from the recipe, the model and the images' contents."""
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        if path not in digests:
            digests[path] = content_sha256(path)
        return digests[path]

    recipes = job.expand(randoms, model.size, model.cfg)
    return [Task(i, run, recipe.task_id(model.id, digest), recipe) for i, (run, recipe) in enumerate(recipes)]


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
    model = model or ModelInfo.of(job.model, job.vae)
    folder = Path(output) if output is not None else job.output
    recorded = randoms if randoms is not None else read_json(folder / RANDOMS)
    randoms = draw_randoms(job.random_slots(), recorded)
    tasks = expand_tasks(job, model, randoms)
    entries = read_manifests(folder) if folder.is_dir() else []
    ids = {t.id for t in tasks}
    done = {k: v for k, v in finished(entries, folder).items() if k in ids}
    names = _names(job, tasks, done, folder, entries)
    all_ids = [t.id for t in tasks]
    if shard is not None:
        tasks = [t for t in tasks if t.index % shard[1] == shard[0]]
        done = {k: v for k, v in done.items() if k in {t.id for t in tasks}}
    return JobPlan(job, model, folder, tasks, done, names, randoms, all_ids)


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


def read_json(path: Path) -> dict:
    """A JSON object from a record file; {} when it is missing or damaged (it is then rebuilt)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
