"""What every backend runs on its device: a pipeline built from a ModelSpec, rendering tasks."""

from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .devices import Render, Results, with_backoff


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its own pipeline: paths and the device, nothing heavy."""

    path: str
    vae: str | None
    device: str
    threads: int | None = None
    tuning: Any = None  # pipeline.Tuning (imported lazily: this module stays free of torch at import)


def build_renderer(spec: ModelSpec) -> Render:
    """A function from a batch of Tasks to their (image, error) pairs, out-of-memory safe."""
    import torch

    from ..images import open_image
    from ..pipeline import Pipeline, Request, Tuning

    if spec.threads:
        torch.set_num_threads(spec.threads)
    dtype = torch.float16 if spec.device.startswith("cuda") else torch.float32
    pipeline = Pipeline.from_file(
        spec.path, vae=spec.vae, device=spec.device, dtype=dtype, tuning=spec.tuning or Tuning()
    )

    def render(batch: list) -> Results:
        images: dict[str, Any] = {}  # opened for this batch only: a folder of inputs is never held at once

        def image(path: str | None) -> Any:
            if path is not None and path not in images:
                images[path] = open_image(path)
            return None if path is None else images[path]

        requests = [Request(t.recipe, image(t.recipe.init_image), image(t.recipe.mask), t.addons) for t in batch]
        return [(r.image, r.error) for r in pipeline.render(requests)]

    return with_backoff(render)


def load_error(spec: ModelSpec, error: BaseException) -> str:
    """One line for a model that did not load in a worker: bad input (a corrupt or unsupported file)
    in its own words, as the single-device path prints it; anything else with the device and type."""
    if isinstance(error, InputError):
        return str(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"could not load the model on {spec.device}: {type(error).__name__}" + (f": {first}" if first else "")
