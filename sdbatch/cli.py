"""The `sdbatch` command. Thin: parsing and printing only; the work lives in the modules it calls.
One error boundary (`_guard`) turns every expected failure into one line and its exit code
(sdbatch.errors): 2 bad input, 75 output folder locked, 130 interrupted.
"""

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__, report
from .errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, InputError, Interrupts, OutputLocked
from .jobs import AXES, load_job
from .output.a1111 import parse_a1111_parameters
from .output.manifest import run_lock
from .output.names import file_name
from .output.png import read_png_text
from .output.sheets import make_sheets
from .plan import RANDOMS, job_model, plan_job
from .recipe import FIELDS
from .rerun import rerun_image
from .runner import Options, run_job
from .text import printable

app = typer.Typer(
    help="Batch renderer for Stable Diffusion v1.x: YAML sweeps, every device busy, reproducible images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True, emoji=False, width=None if sys.stdout.isatty() else 200)  # logs: no wrapping at 80
err = Console(stderr=True, soft_wrap=True, emoji=False)  # :dog: in a prompt stays text


def _usage_error(e: "click.ClickException") -> None:
    """An option or argument the command line gets wrong, in one line like every other error (typer
    draws a framed usage box of several lines, which logs and scripts read badly); exit 2 as before."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "sdbatch"
    err.print("[red]error:[/] ", end="")
    err.print(printable(f"{where}: {e.format_message()} (see {where} --help)"), markup=False, highlight=False)


try:  # typer looks this up when it reports a usage error
    import click
    import typer.rich_utils

    typer.rich_utils.rich_format_error = _usage_error
except (ImportError, AttributeError):  # pragma: no cover - another typer: its own report stays
    pass


@contextmanager
def _guard() -> Iterator[None]:
    """The one error boundary: bad input, a locked folder or an interrupt becomes one line on
    stderr (user text printed unstyled) and its exit code; anything else is a bug and says so."""
    try:
        yield
        if Interrupts.deferred:  # a Ctrl-C that landed during an import (errors.on_interrupt)
            raise KeyboardInterrupt
    except (InputError, OutputLocked, OSError) as e:
        err.print("[red]error:[/] ", end="")
        err.print(printable(str(e)), markup=False, highlight=False)  # a path from argv may hold any bytes
        raise typer.Exit(getattr(e, "exit_code", EXIT_BAD_INPUT)) from None
    except KeyboardInterrupt:  # before rendering began (loading), or a second Ctrl-C
        err.print("interrupted", markup=False, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _version(value: bool) -> None:
    if value:
        out.print(f"sdbatch {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command("check-model")
def check_model(
    path: Annotated[Path, typer.Argument(help="A .safetensors/.ckpt file, a diffusers folder, or a name (demo).")],
    vae: Annotated[Path | None, typer.Option(help="A separate VAE file or folder to load with it.")] = None,
    config: Annotated[
        str | None, typer.Option(help="Model config name (default: what the file says, or sd15).")
    ] = None,
    hash_: Annotated[bool, typer.Option("--hash/--no-hash", help="Compute the sha256 (cached after once).")] = True,
) -> None:
    """Load a model fully and say what it is: kind, hash, sizes and where its tokenizer comes from."""
    from .checkpoints import describe, load_model, model_hash, resolve_model
    from .tokenizer import load_tokenizer

    with _guard():
        path = resolve_model(path)
        kind, shapes, _ = describe(path)
        _say(printable(f"{path}: {kind.description} ({len(shapes)} tensors)"))
        loaded = load_model(path, vae=vae, config=config)
        model = loaded.model
        for name, part in (("unet", model.unet), ("vae", model.vae), ("text encoder", model.text_encoder)):
            _say(f"  {name:<13}{sum(p.numel() for p in part.parameters()):>14,} parameters")
        _say(f"  config       {loaded.config.name}")
        _say(printable(f"  tokenizer    {load_tokenizer(path, vocab_size=loaded.config.clip.vocab_size).source}"))
        if hash_:
            _say(f"  model hash   {model_hash(path)}")


def _say(text: str) -> None:
    """User text (prompts, paths) printed as it is: Rich markup must never eat [brackets]."""
    out.print(printable(text), markup=False, highlight=False)


JobArg = Annotated[Path, typer.Argument(help="The job file (YAML).", show_default=False)]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output folder (default: the job's).")]


def _output(text: str | None) -> Path | None:
    """The --output folder; an empty one is refused rather than taken as the current folder."""
    if text is not None and not text.strip():
        raise InputError("--output: empty path; name a folder")
    return Path(text) if text is not None else None


@app.command()
def validate(job_file: JobArg) -> None:
    """Check a job file, its model's header, images and prompt files; render nothing. Exit 2 on any problem."""
    from .checkpoints import check_model_files
    from .plan import check_job_addons

    with _guard():
        job = load_job(job_file)
        model = job_model(job)
        check_model_files(model.path, model.vae)  # both headers, kinds, configs and key shapes; no weights read
        images = job.check(model.size, model.cfg)  # the rules again, at the model's own size
        check_job_addons(job, model)  # LoRA and embedding files: found, hashed, headers checked
    for note in job.notes:
        _say(f"note: {note}")
    slots = job.random_slots()
    extra = f" ({sum(slots.values())} seeds drawn at random when it first runs)" if slots else ""
    _say(f"{printable(str(job_file))}: ok: {images} images in {len(job.runs)} run(s){extra}")


@app.command()
def plan(
    job_file: JobArg,
    output: OutputOpt = None,
    show: Annotated[int, typer.Option(min=0, help="How many tasks to list.")] = 20,
    explain_prompt: Annotated[
        bool,
        typer.Option(
            "--explain-prompt", help="Show how the listed tasks' prompts parse: edits, weights, tokens per chunk."
        ),
    ] = False,
) -> None:
    """Print the expanded plan: values per axis, the first tasks, and how many are already done."""
    with _guard():
        p = plan_job(load_job(job_file), _output(output))
        explained = _explain_prompts(p, show) if explain_prompt else []
    counts = {axis: len({repr(getattr(t.recipe, axis)) for t in p.tasks}) for axis in AXES}
    axes = ", ".join(f"{axis} {n}" for axis, n in counts.items() if n > 1) or "nothing varies"
    merged = f"; {p.merged} duplicate combinations merged (one id, one image)" if p.merged else ""
    _say(f"{p.job.name}: {len(p.tasks)} images ({axes}) with {p.model.path}{merged}")
    found = f" ({len(p.found)} on disk without their manifest line)" if p.found else ""
    aside = f"; {len(p.aside)} files in the way will be moved to aside/" if p.aside else ""
    _say(f"output {p.output}: {len(p.done) + len(p.found)} already done{found}, {len(p.todo)} to render{aside}")
    if p.job.random_slots() and not (p.output / RANDOMS).exists():
        _say("seed: random is drawn when the job first runs; the seeds below are an example")
    table = Table("#", "file", "prompt", "seed", "steps", "sampler", "cfg", "size", "done", box=None)
    for t in p.tasks[:show]:
        r = t.recipe
        table.add_row(
            str(t.index),
            p.names.get(t.id, file_name(p.job.filename, t)),
            r.prompt if len(r.prompt) <= 40 else r.prompt[:39] + "…",
            str(r.seed),
            str(r.steps),
            r.sampler + (" karras" if r.karras else ""),
            f"{r.cfg:g}",
            f"{r.width}x{r.height}",
            "yes" if t.id in p.done or t.id in p.found else "",
            style=None,
        )
    out.print(table, markup=False)
    if len(p.tasks) > show:
        _say(f"... and {len(p.tasks) - show} more")
    for line in explained:
        _say(line)


def _explain_prompts(p, show: int) -> list[str]:
    """How each distinct prompt of the listed tasks parses, as A1111 reads it: where prompt editing
    switches, each part's weighted runs, and the tokens of each 75-token chunk (the tokenizer,
    not the model, is loaded)."""
    from .prompts import explain, parse_attention, prompt_schedule
    from .prompts.networks import lora_label, strip_networks
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(p.model.path, vocab_size=p.model.config.clip.vocab_size)
    length = p.model.config.clip.max_positions - 2
    lines: list[str] = []
    seen: set[tuple] = set()
    for t in p.tasks[:show]:
        r = t.recipe
        for label, text in (("prompt", r.prompt), ("negative", r.negative)):
            if (text, r.steps, r.emphasis) in seen or (label == "negative" and not text):
                continue
            seen.add((text, r.steps, r.emphasis))
            lines.append(f"{label} {text!r} ({r.steps} steps, emphasis {r.emphasis}, clip skip {r.clip_skip}):")
            if label == "prompt":
                if t.addons.loras:
                    lines.append(f"  LoRAs merged: {lora_label([(u.name, u.te, u.unet) for u in t.addons.loras])}")
                text = strip_networks(text)  # what CLIP sees: A1111 takes the tags out first
            if names := [u.name for u in t.addons.embeddings]:
                lines.append(f"  embeddings that may apply (by name): {', '.join(names)}")
            lines.extend(f"  {line}" for line in explain(text, r.steps, negative=label == "negative"))
            for end, part in prompt_schedule(text, r.steps):
                pieces = [(part, 1.0)] if r.emphasis == "none" else parse_attention(part)
                chunks = tokenizer.chunks(pieces, length)
                counts = ", ".join(str(sum(1 for i in c.ids[1:-1] if i != tokenizer.eos)) for c in chunks)
                lines.append(f"  until step {end}: {len(chunks)} chunk(s) of {counts} tokens")
    return lines


@app.command()
def run(
    job_file: JobArg,
    output: OutputOpt = None,
    devices: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda, cuda:1 (default: the job's, else auto).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per UNet batch (default: auto).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and report; render and write nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only failures.")] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="JSON lines on stdout instead of text.")] = False,
    shard: Annotated[
        str | None, typer.Option(help="i/n: render only tasks whose index is i modulo n (cron, SLURM arrays).")
    ] = None,
    backend: Annotated[str, typer.Option(help="local (worker per device) or ray (sdbatch[ray]).")] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray).")
    ] = None,
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile the UNet (slow first batch, faster after).")
    ] = False,
    cuda_graphs: Annotated[bool, typer.Option(help="With --compile on a GPU: replay steps as CUDA graphs.")] = False,
    channels_last: Annotated[bool, typer.Option(help="NHWC activations (faster convolutions on GPUs).")] = False,
    vae_batch: Annotated[int | None, typer.Option(min=1, help="Decode at most N images at a time.")] = None,
    vae_tile: Annotated[
        int | None, typer.Option(min=4, help="Decode latents larger than N cells in tiles (64 = 512 px).")
    ] = None,
    upscale_tile: Annotated[
        int, typer.Option(min=0, help="Run hires upscaler models in tiles of N px (0: whole image).")
    ] = 192,
    low_vram: Annotated[
        bool, typer.Option(help="Keep text encoder and VAE off the GPU except while they run.")
    ] = False,
) -> None:
    """Render a job. Finished images are skipped, so running it again resumes. Exit codes: 0 done,
    1 some images failed, 2 bad input, 75 output folder in use by another run, 130 interrupted."""
    reporter = _reporter(quiet, log_json)
    try:
        with _guard():
            if backend not in ("local", "ray"):
                raise InputError(f"--backend: {backend!r}; use local or ray")
            if backend == "ray":  # a malformed address fails before the lock and before torch loads
                from .render.ray import resolve_address

                resolve_address(ray_address)
            options = Options(
                output=_output(output),
                device=devices or "auto",
                batch_size=batch_size,
                dry_run=dry_run,
                shard=_shard(shard),
                backend=backend,
                ray_address=ray_address,
                tuning=_tuning(compile_, cuda_graphs, channels_last, vae_batch, low_vram, vae_tile, upscale_tile),
            )
            summary = run_job(load_job(job_file), options, reporter)
    finally:
        reporter.close()
    raise typer.Exit(summary.exit_code)


def _reporter(quiet: bool, log_json: bool):
    if log_json:
        return report.JsonReporter()
    if quiet:
        return report.QuietReporter()
    return report.RichReporter(out) if sys.stdout.isatty() else report.PlainReporter()


def _tuning(compile_, cuda_graphs, channels_last, vae_batch, low_vram, vae_tile, upscale_tile=192):
    """The speed and memory options; imported only when a run renders (the pipeline needs torch)."""
    from .pipeline import Tuning

    if Interrupts.deferred:  # a Ctrl-C during that import (torch's): stop before any work
        raise KeyboardInterrupt
    return Tuning(channels_last, compile_, cuda_graphs, vae_batch, low_vram, vae_tile, upscale_tile or None)


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise InputError(f"--shard {text!r}: write i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(m[1]), int(m[2])


@app.command()
def inspect(image: Annotated[Path, typer.Argument(help="A PNG written by sdbatch or A1111.")]) -> None:
    """Print the recipe stored in an image (sdbatch's own, else A1111's parameters text)."""
    from .recipe import Recipe

    with _guard():
        text = read_png_text(image)
        shown = printable(str(image))
        if "sdbatch" in text:
            damaged = f"{shown}: its sdbatch metadata is damaged"
            try:
                meta = json.loads(text["sdbatch"])
            except (ValueError, RecursionError) as e:
                raise InputError(f"{damaged} (not JSON: {e})") from None
            if not isinstance(meta, dict):
                raise InputError(f"{damaged} (a JSON {type(meta).__name__}, not an object)")
            task, model = meta.get("task", {}), meta.get("model", {})
            if not isinstance(task, dict) or not isinstance(model, dict):
                raise InputError(f"{damaged} (its task and model must be JSON objects)")
            try:
                Recipe.from_record(task, where=f"{damaged}: ")  # values of the wrong type or out of range
            except (OverflowError, RecursionError) as e:
                raise InputError(f"{damaged} (a value is out of range: {e})") from None
            _say(printable(f"{image} (sdbatch {meta.get('version')}, job {meta.get('job')})"))
            _say(printable(f"  model      {model.get('name')} ({model.get('path')}, sha256 {model.get('sha256')})"))
            for key in (*FIELDS, "id"):
                if key in task and (task[key] is not None or key not in ("init_image", "mask")):
                    _say(printable(f"  {key:<10} {task[key]}"))
        elif "parameters" in text:
            _say(f"{shown} (A1111 parameters)")
            for key, value in parse_a1111_parameters(text["parameters"]).items():
                _say(printable(f"  {key:<18} {value}"))
        else:
            raise InputError(f"{shown}: carries no generation parameters (no sdbatch or A1111 metadata)")


@app.command()
def rerun(
    image: Annotated[Path, typer.Argument(help="A PNG written by sdbatch (or A1111, with --model).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the new image.")] = "outputs/rerun",
    model: Annotated[str | None, typer.Option(help="Model to use (default: the one the image names).")] = None,
    devices: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "auto",
) -> None:
    """Render an image again from the recipe it carries, into another folder, under the same name."""
    with _guard():
        path = rerun_image(image, _output(output), model=model, device=devices)
    _say(f"wrote {path}")


@app.command(name="import")
def import_(
    source: Annotated[
        Path, typer.Argument(help="An A1111/civitai PNG, JPEG or WebP, or a text file with its parameters.")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the job here (default: print it).")
    ] = None,
    lenient: Annotated[
        bool, typer.Option("--lenient", help="Write what cannot be reproduced as comments instead of failing.")
    ] = False,
) -> None:
    """Write a job file that renders an A1111 image again (then edit it into a sweep). Exit 2 naming
    every field sdbatch cannot reproduce, unless --lenient."""
    from .importer import import_job

    with _guard():
        text, warnings = import_job(source, lenient, output)
    for warning in warnings:
        print(printable(f"warning: {warning}"), file=sys.stderr)
    if output is None:
        print(text, end="")
    else:
        _say(f"wrote {printable(str(output))}")


@app.command()
def sheets(folder: Annotated[Path, typer.Argument(help="An output folder with a manifest.")]) -> None:
    """(Re)build the contact sheets of an output folder, e.g. after all shards of a job are done."""
    with _guard():
        if not folder.is_dir():
            raise InputError(f"{printable(str(folder))}: not a folder")
        if not any(folder.glob("manifest*.jsonl")):
            raise InputError(f"{printable(str(folder))}: no manifest.jsonl here; is it an sdbatch output folder?")
        with run_lock(folder):  # not while a run writes the folder (exit 75)
            sheets = make_sheets(folder)
        for path in sheets:
            _say(printable(f"sheet: {path}"))
