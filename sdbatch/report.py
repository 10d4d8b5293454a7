"""How a run talks: a rich progress bar on a terminal, one plain line per image for cron and logs,
JSON lines for scripts (--log-json), or nothing but errors (--quiet)."""

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from .jobs import Job, Task
from .runner import Reporter, Summary


def _summary_line(s: Summary) -> str:
    rate = f", {s.rendered / s.seconds:.2f} img/s" if s.rendered and s.seconds > 0 else ""
    if s.dry_run:
        return f"{s.job}: dry run: {s.total - s.skipped} to render, {s.skipped} already done of {s.total} -> {s.output}"
    state = "stopped" if s.stopped else ("interrupted" if s.interrupted else "done")
    parts = [f"{s.rendered} rendered", f"{s.skipped} already done", f"{len(s.failed)} failed"]
    line = f"{s.job}: {state}: {', '.join(parts)} of {s.total} in {s.seconds:.1f} s{rate} -> {s.output}"
    return line + (f" ({s.stopped})" if s.stopped else "")


class PlainReporter(Reporter):
    """One line per image on stdout; errors on stderr. Meant for cron mail and log files."""

    def __init__(self, out=None, err=None):
        self.out, self.err = out or sys.stdout, err or sys.stderr

    def _print(self, text: str, err: bool = False) -> None:
        stream = self.err if err else self.out
        print(text, file=stream, flush=True)

    def start(self, job: Job, total: int, todo: int, output: Path) -> None:
        self._print(f"{job.name}: {total} images, {total - todo} already done, {todo} to render -> {output}")

    def image(self, task: Task, file: str | None, error: str | None, done: int, todo: int, rate: float) -> None:
        if file is not None:
            self._print(f"[{done}/{todo}] {file} seed={task.recipe.seed} cfg={task.recipe.cfg:g} ({rate:.2f} img/s)")
        else:
            self._print(f"[{done}/{todo}] FAILED task {task.id} seed={task.recipe.seed}: {error}", err=True)

    def note(self, message: str) -> None:
        self._print(message, err=True)

    def end(self, summary: Summary) -> None:
        self._print(_summary_line(summary))
        for sheet in summary.sheets:
            self._print(f"sheet: {sheet}")
        for task_id, why in summary.failed:
            self._print(f"failed: {task_id}: {why}", err=True)


class QuietReporter(PlainReporter):
    """Nothing on success: failures and interruptions only, on stderr."""

    def start(self, job: Job, total: int, todo: int, output: Path) -> None:
        pass

    def image(self, task: Task, file: str | None, error: str | None, done: int, todo: int, rate: float) -> None:
        if file is None:
            super().image(task, file, error, done, todo, rate)

    def end(self, summary: Summary) -> None:
        if summary.failed or summary.interrupted or summary.stopped:
            self._print(_summary_line(summary), err=True)


class JsonReporter(Reporter):
    """One JSON object per line on stdout: `start`, `image` (or `failed`), `note`, `summary` events."""

    def __init__(self, out=None):
        self.out = out or sys.stdout

    def _emit(self, event: str, **data: Any) -> None:
        print(json.dumps({"event": event, **data}, ensure_ascii=False, default=str), file=self.out, flush=True)

    def start(self, job: Job, total: int, todo: int, output: Path) -> None:
        self._emit("start", job=job.name, total=total, todo=todo, skipped=total - todo, output=str(output))

    def image(self, task: Task, file: str | None, error: str | None, done: int, todo: int, rate: float) -> None:
        event = "image" if file is not None else "failed"
        self._emit(
            event, id=task.id, file=file, error=error, seed=task.recipe.seed, done=done, todo=todo, rate=round(rate, 4)
        )

    def note(self, message: str) -> None:
        self._emit("note", message=message)

    def end(self, s: Summary) -> None:
        self._emit(
            "summary",
            job=s.job,
            output=str(s.output),
            total=s.total,
            rendered=s.rendered,
            skipped=s.skipped,
            failed=[{"id": i, "error": e} for i, e in s.failed],
            seconds=round(s.seconds, 3),
            interrupted=s.interrupted,
            stopped=s.stopped,
            adopted=s.adopted,
            merged=s.merged,
            sheets=[str(p) for p in s.sheets],
            exit_code=s.exit_code,
        )


class RichReporter(PlainReporter):
    """A progress bar with images, img/s and ETA, for a terminal."""

    def __init__(self, console: Console | None = None):
        super().__init__()
        self.console = console or Console(emoji=False)
        self.progress: Progress | None = None
        self.bar = None

    def start(self, job: Job, total: int, todo: int, output: Path) -> None:
        self.console.print(
            Text.assemble((job.name, "bold"), f": {total} images, {total - todo} already done -> {output}")
        )
        if todo:
            self.progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.bar = self.progress.add_task("rendering", total=todo, rate="")

    def image(self, task: Task, file: str | None, error: str | None, done: int, todo: int, rate: float) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, completed=done, rate=f"{rate:.2f} img/s")
        if file is None:
            self.console.print(Text.assemble(("failed", "red"), f" task {task.id} (seed {task.recipe.seed}): {error}"))

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def end(self, summary: Summary) -> None:
        self.close()
        color = "red" if summary.failed else ("yellow" if summary.interrupted else "green")
        self.console.print(Text(_summary_line(summary), style=color), highlight=False)
        for sheet in summary.sheets:
            self.console.print(f"sheet: {sheet}", markup=False, highlight=False)
        for task_id, why in summary.failed:
            self.console.print(Text.assemble(("failed", "red"), f" {task_id}: {why}"), highlight=False)
