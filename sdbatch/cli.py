"""The `sdbatch` command. Thin: parsing and printing only; the work lives in the modules it calls.

Exit codes: 0 success, 1 some images failed, 2 bad input (job file, weights, arguments),
75 output folder locked by another run, 130 interrupted.
"""

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import InputError

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_INTERRUPTED = 1, 2, 75, 130

app = typer.Typer(
    help="Batch renderer for Stable Diffusion v1.x: YAML sweeps, every device busy, reproducible images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # logs: no wrapping at 80
err = Console(stderr=True, soft_wrap=True)


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
    from .checkpoint import describe, load_model, model_hash, resolve_model

    try:
        path = resolve_model(path)
        kind, shapes, _ = describe(path)
        out.print(f"[bold]{path}[/]: {kind.description} ({len(shapes)} tensors)")
        loaded = load_model(path, vae=vae, config=config)
        model = loaded.model
        for name, part in (("unet", model.unet), ("vae", model.vae), ("text encoder", model.text_encoder)):
            out.print(f"  {name:<13}{sum(p.numel() for p in part.parameters()):>14,} parameters")
        out.print(f"  config       {loaded.config.name}")
        from .tokenizer import load_tokenizer  # transformers costs a second or two: only once it is needed

        tokenizer = load_tokenizer(path, vocab_size=loaded.config.clip.vocab_size)
        out.print(f"  tokenizer    {tokenizer.source}")
        if hash_:
            out.print(f"  model hash   {model_hash(path)}")
    except (InputError, OSError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _fail(e: BaseException, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    err.print(f"[red]error:[/] {e}", highlight=False)
    return typer.Exit(code)


def _load(job_file: Path):
    from .jobs import load_job

    return load_job(job_file)


JobArg = Annotated[Path, typer.Argument(help="The job file (YAML).", show_default=False)]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Output folder (default: the job's).")]


@app.command()
def validate(job_file: JobArg) -> None:
    """Check a job file and its model, images and prompt files; render nothing. Exit 2 on any problem."""
    from .checkpoint import resolve_model

    try:
        job = _load(job_file)
        resolve_model(job.model)
    except InputError as e:
        raise _fail(e) from None
    slots = job.random_slots()
    count = sum(_run_size(r) for r in job.runs)
    extra = f" ({sum(slots.values())} seeds drawn at random when it first runs)" if slots else ""
    out.print(f"{job_file}: ok: {count} images in {len(job.runs)} run(s){extra}", highlight=False)


def _run_size(run) -> int:
    import math

    from .jobs import _axis_len

    return math.prod(_axis_len(v) for v in run.values.values())


@app.command()
def plan(
    job_file: JobArg,
    output: OutputOpt = None,
    show: Annotated[int, typer.Option(help="How many tasks to list.")] = 20,
) -> None:
    """Print the expanded plan: values per axis, the first tasks, and how many are already done."""
    from rich.table import Table

    from .jobs import axis_counts
    from .runner import plan_job

    try:
        p = plan_job(_load(job_file), output)
    except InputError as e:
        raise _fail(e) from None
    counts = axis_counts(p.tasks)
    axes = ", ".join(f"{axis} {n}" for axis, n in counts.items() if n > 1) or "nothing varies"
    out.print(f"[bold]{p.job.name}[/]: {len(p.tasks)} images ({axes}) with {p.model_path}", highlight=False)
    out.print(f"output {p.output}: {len(p.done)} already done, {len(p.todo)} to render", highlight=False)
    if p.job.random_slots() and not (p.output / "randoms.json").exists():
        out.print("seed: random is drawn when the job first runs; the seeds below are an example", highlight=False)
    table = Table("#", "file", "prompt", "seed", "steps", "sampler", "cfg", "size", "done", box=None)
    for t in p.tasks[:show]:
        sampler = t.sampler + (" karras" if t.karras else "")
        table.add_row(
            str(t.index),
            p.names[t.id],
            t.prompt if len(t.prompt) <= 40 else t.prompt[:39] + "…",
            str(t.seed),
            str(t.steps),
            sampler,
            f"{t.cfg:g}",
            f"{t.width}x{t.height}",
            "yes" if t.id in p.done else "",
        )
    out.print(table)
    if len(p.tasks) > show:
        out.print(f"... and {len(p.tasks) - show} more")


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
    low_vram: Annotated[
        bool, typer.Option(help="Keep text encoder and VAE off the GPU except while they run.")
    ] = False,
) -> None:
    """Render a job. Finished images are skipped, so running it again resumes. Exit codes: 0 done,
    1 some images failed, 2 bad input, 75 output folder in use by another run, 130 interrupted."""
    from . import report
    from .output import OutputLocked
    from .runner import Options, run_job

    if log_json:
        reporter = report.JsonReporter()
    elif quiet:
        reporter = report.QuietReporter()
    elif sys.stdout.isatty():
        reporter = report.RichReporter(out)
    else:
        reporter = report.PlainReporter()
    try:
        job = _load(job_file)
        if backend not in ("local", "ray"):
            raise InputError(f"--backend: {backend!r}; use local or ray")
        options = Options(
            output=output,
            device=devices or "auto",
            batch_size=batch_size,
            dry_run=dry_run,
            shard=_shard(shard),
            backend=backend,
            ray_address=ray_address,
            fast=_fast(compile_, cuda_graphs, channels_last, vae_batch, low_vram, vae_tile),
        )
        summary = run_job(job, options, reporter)
    except InputError as e:
        raise _fail(e) from None
    except OutputLocked as e:
        raise _fail(e, EXIT_LOCKED) from None
    except KeyboardInterrupt:  # before rendering began (loading), or a second Ctrl-C
        raise _fail(InputError("interrupted"), EXIT_INTERRUPTED) from None
    finally:
        reporter.close()
    raise typer.Exit(summary.exit_code)


def _fast(compile_, cuda_graphs, channels_last, vae_batch, low_vram, vae_tile):
    from .pipeline import FastPath

    return FastPath(channels_last, compile_, cuda_graphs, vae_batch, low_vram, vae_tile)


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise InputError(f"--shard {text!r}: write i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(m[1]), int(m[2])


@app.command()
def inspect(image: Annotated[Path, typer.Argument(help="A PNG written by sdbatch or A1111.")]) -> None:
    """Print the recipe stored in an image (sdbatch's own, else A1111's parameters text)."""
    from .output import read_png_text

    try:
        text = read_png_text(image)
    except InputError as e:
        raise _fail(e) from None
    if "sdbatch" in text:
        import json

        meta = json.loads(text["sdbatch"])
        task = meta.get("task", {})
        out.print(f"[bold]{image}[/] (sdbatch {meta.get('version')}, job {meta.get('job')})", highlight=False)
        model = meta.get("model", {})
        out.print(
            f"  model      {model.get('name')} ({model.get('path')}, sha256 {model.get('sha256')})", highlight=False
        )
        for key in ("prompt", "negative", "seed", "steps", "sampler", "karras", "cfg", "size", "strength"):
            out.print(f"  {key:<10} {task.get(key)}", highlight=False)
        for key in ("init_image", "mask", "id"):
            if task.get(key) is not None:
                out.print(f"  {key:<10} {task.get(key)}", highlight=False)
    elif "parameters" in text:
        from .output import parse_a1111_parameters

        out.print(f"[bold]{image}[/] (A1111 parameters)", highlight=False)
        for key, value in parse_a1111_parameters(text["parameters"]).items():
            out.print(f"  {key:<18} {value}", highlight=False)
    else:
        raise _fail(InputError(f"{image}: carries no generation parameters (no sdbatch or A1111 metadata)"))


@app.command()
def rerun(
    image: Annotated[Path, typer.Argument(help="A PNG written by sdbatch (or A1111, with --model).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the new image.")] = Path("outputs/rerun"),
    model: Annotated[str | None, typer.Option(help="Model to use (default: the one the image names).")] = None,
    devices: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "auto",
) -> None:
    """Render an image again from the recipe it carries, into another folder, under the same name."""
    from .rerun import rerun_image

    try:
        path = rerun_image(image, output, model=model, device=devices)
    except InputError as e:
        raise _fail(e) from None
    out.print(f"wrote {path}", highlight=False)


@app.command()
def sheets(folder: Annotated[Path, typer.Argument(help="An output folder with a manifest.")]) -> None:
    """(Re)build the contact sheets of an output folder, e.g. after all shards of a job are done."""
    from .runner import make_sheets

    if not any(folder.glob("manifest*.jsonl")):
        raise _fail(InputError(f"{folder}: no manifest.jsonl here; is it an sdbatch output folder?"))
    for path in make_sheets(folder):
        out.print(f"sheet: {path}", highlight=False)
