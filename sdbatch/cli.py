"""The `sdbatch` command. Thin: parsing and printing only; the work lives in the modules it calls.

Exit codes: 0 success, 1 some images failed, 2 bad input (job file, weights, arguments),
75 output folder locked by another run, 130 interrupted.
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import InputError

EXIT_BAD_INPUT = 2

app = typer.Typer(
    help="Batch renderer for Stable Diffusion v1.x: YAML sweeps, every device busy, reproducible images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
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
