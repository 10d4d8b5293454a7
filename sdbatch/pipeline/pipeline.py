"""txt2img, img2img and inpainting with classifier-free guidance, for a batch of recipes at once.

Determinism: every random draw for an image (the VAE's latent sample, the initial noise, each
ancestral step's noise) comes from a CPU `torch.Generator` seeded with that image's seed alone, in
the order diffusers uses with a list of CPU generators. So an image does not change with the batch
it is in, its position, or the device; and it equals diffusers' image for the same seed and weights.
"""

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .. import hires
from ..addons.embeddings import EmbeddingLookup, read_embedding
from ..addons.library import Addons, EmbeddingUse, LoraUse
from ..addons.lora import LoraFile, read_lora
from ..addons.merge import Merger
from ..checkpoints import file_sha256, load_model, resolve_model
from ..errors import InputError
from ..models import StableDiffusion
from ..prompts import parse_attention, prompt_schedule
from ..prompts.networks import strip_networks
from ..recipe import EMPHASIS, Recipe
from ..samplers import A1111_TIMESTEPS, NoiseSchedule, get_sampler
from ..samplers.brownian import BrownianNoise
from ..samplers.schedule import StepPlan, a1111_img2img
from ..samplers.sigmas import DISCARD_NEXT_TO_LAST, a1111_plan, automatic_plan, sigma_to_t
from ..samplers.timesteps import a1111_plan as timestep_plan
from ..tokenizer import COMMA_BACKTRACK, Tokenizer, load_tokenizer
from . import start
from .decode import tiled_decode, upcast
from .guidance import GuidanceRows, Schedule
from .images import image_tensor, mask_tensor, to_pil

PROMPT_CACHE_SIZE = 1024


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str, empty: torch.Tensor | None) -> torch.Tensor:
    """Token weights applied to CLIP's output z (k chunks, 77, width), chunk by chunk.

    original (A1111's default): z * w, then rescaled so that the chunk's mean is what it was
        (A1111 keeps the mean to avoid artefacts; it is why weights act only relative to each other).
    no-norm (A1111's "No norm"): z * w.
    comfy (ComfyUI): each weighted token moves away from or towards the empty prompt's state at its
        position, z_empty + (z - z_empty) * w, so weight 0 means "as if absent", not "zero vector".
    ignore (A1111's "Ignore"): none; the brackets were still parsed away (unlike "none", where
        they are text CLIP reads).
    """
    if mode == "ignore":
        return z
    z32, w = z.float(), weights.float()[..., None]
    if mode == "comfy":
        assert empty is not None
        e = empty.float()
        out = torch.where(w != 1, (z32 - e) * w + e, z32)  # ComfyUI leaves weight-1 tokens untouched
    else:
        out = z32 * w
        if mode == "original":
            out = out * (z32.mean(dim=(1, 2), keepdim=True) / out.mean(dim=(1, 2), keepdim=True))
    return out.to(z.dtype)


def _calls_per_step(recipe: Recipe) -> int:
    """Model calls A1111 counts per step for prompt editing: 2 for its second-order samplers."""
    return 2 if get_sampler(recipe.sampler).second_order and recipe.a1111_sigmas else 1


class RequestError(InputError):
    """A request that cannot be rendered as given; the message says which field and why."""


@dataclass(frozen=True)
class Request:
    """A recipe with its init image and mask opened. The recipe's `init_image` / `mask` name them
    (a path, or any label for images made in memory), so its mode and batch key stay the recipe's."""

    recipe: Recipe
    init_image: Image.Image | None = field(default=None, compare=False)
    mask: Image.Image | None = field(default=None, compare=False)  # white = repaint
    addons: Addons = field(default_factory=Addons, compare=False)  # the recipe's LoRAs and embeddings, as files

    def __post_init__(self) -> None:
        for name in ("init_image", "mask"):
            if (getattr(self.recipe, name) is None) != (getattr(self, name) is None):
                raise RequestError(f"{name}: the recipe and the request must both have one, or neither")
        self.recipe.check()
        named = [(u.name, u.te, u.unet) for u in self.addons.loras]
        if named != list(self.recipe.loras()):
            raise RequestError(
                "lora: the request's LoRA files are not the recipe's LoRAs (resolve them with a Library)"
            )


@dataclass
class Result:
    request: Request
    image: Image.Image | None
    error: str | None = None  # why no image: NaN/inf latents, say
    latents: torch.Tensor | None = field(default=None, repr=False)  # (4, h, w) final scaled latents, on CPU

    @property
    def ok(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class Tuning:
    """How the pipeline uses its device: speed and memory options. None of them changes what an
    image shows (beyond float rounding, tested), except vae_tile (see below).

    channels_last: NHWC activations for the UNet and VAE (faster convolutions on tensor cores).
    compile: torch.compile the UNet; compiled once per batch shape and reused (first-call cost in
        `Pipeline.compile_seconds`).
    vae_batch: decode at most this many images at a time (less memory for big batches or sizes).
    vae_tile: decode large latents in overlapping tiles of this many latent cells (64 = 512 px for
        SD), blended linearly across a quarter-tile overlap, as diffusers' tiled VAE does. Memory
        stays that of one tile whatever the size; unlike the other options this one can change
        pixels a little (the VAE's mid-block attention sees one tile, not the image).
    low_vram: keep the text encoder and VAE on the CPU and move each to the device only while it
        runs (the seed's idle_device), so a small GPU holds little more than the UNet.
    """

    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False  # with compile: mode "reduce-overhead" (CUDA graphs replay each step)
    vae_batch: int | None = None
    low_vram: bool = False
    vae_tile: int | None = None  # decode latents larger than this many cells per side in tiles
    upscale_tile: int | None = 192  # upscaler models run in tiles of this many pixels (A1111's default)


class Pipeline:
    """One model on one device; `render` takes a list of requests with one batch key."""

    def __init__(
        self,
        model: StableDiffusion,
        tokenizer: Tokenizer,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tuning: Tuning = Tuning(),
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.tuning = tuning
        self.model = model.eval().requires_grad_(False)
        idle = torch.device("cpu") if tuning.low_vram else self.device
        self.model.unet.to(device=self.device, dtype=dtype)
        self.model.vae.to(device=idle, dtype=dtype)
        self.model.text_encoder.to(device=idle, dtype=dtype)
        if tuning.channels_last:
            self.model.unet.to(memory_format=torch.channels_last)
            self.model.vae.to(memory_format=torch.channels_last)
        self.unet: Callable = self.model.unet
        if tuning.compile:
            mode = "reduce-overhead" if tuning.cuda_graphs and self.device.type == "cuda" else None
            self.unet = torch.compile(self.model.unet, dynamic=False, mode=mode)
        self.compile_seconds: dict[tuple, float] = {}  # batch shape -> first call (compile) time
        self.tokenizer = tokenizer
        self.schedule = NoiseSchedule()  # diffusers' (float32), for the samplers planned as diffusers plans
        self._ldm = {False: NoiseSchedule.compvis(), True: NoiseSchedule.compvis_fp16()}  # by downcast_alphas
        self.latent_factor = 2 ** (len(model.config.vae.ch_mult) - 1)
        self.inpainting_model = model.config.unet.in_channels == 9
        self._prompts: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.merger = Merger(self.model)
        self._merged: tuple | None = ()  # the LoRA set in the weights now: ((path, sha256, te, unet), ...)
        self._addon_files: dict[tuple[str, str], Any] = {}  # (path, sha256) -> LoraFile or Embedding
        self._lookups: dict[tuple[EmbeddingUse, ...], EmbeddingLookup] = {}

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        vae: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tuning: Tuning = Tuning(),
    ) -> "Pipeline":
        path = resolve_model(path)  # a file, a folder, or a name such as "demo"
        load_to = "cpu" if tuning.low_vram else device
        loaded = load_model(path, vae=vae, device=load_to, dtype=dtype)
        tokenizer = load_tokenizer(path, vocab_size=loaded.config.clip.vocab_size)
        return cls(loaded.model, tokenizer, device, dtype, tuning)

    @contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """With low_vram, a module visits the device only while it runs."""
        if not self.tuning.low_vram or self.device.type == "cpu":
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.tuning.channels_last else x

    # -- prompts

    def token_windows(self, text: str) -> torch.Tensor:
        """(k, 77) ids: the prompt cut into 75-token windows (for SD's 77 positions), each framed by
        start/end tokens and padded with the end token: long prompts are encoded whole, never cut."""
        ids = self.tokenizer.tokens(text)
        chunk = self.model.config.clip.max_positions - 2  # 75 for SD; smaller for the demo model
        windows = [ids[i : i + chunk] for i in range(0, len(ids), chunk)] or [[]]
        bos, eos = self.tokenizer.bos, self.tokenizer.eos
        return torch.tensor([[bos, *w, eos] + [eos] * (chunk - len(w)) for w in windows], dtype=torch.long)

    def prompt_chunks(
        self, text: str, emphasis: str = "original", embeddings: EmbeddingLookup | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(k, 77) ids, their (k, 77) emphasis weights, and per chunk the embedding vectors that
        replace placeholder tokens. With emphasis "none" brackets are plain text and the prompt is
        cut into plain 75-token windows (`token_windows`; no embeddings); otherwise it is parsed for
        emphasis and BREAK and chunked as A1111 does (`Tokenizer.chunks`)."""
        if emphasis == "none" and embeddings is None:
            ids = self.token_windows(text)
            return ids, torch.ones(ids.shape), [[] for _ in ids]
        pieces = [(text, 1.0)] if emphasis == "none" else parse_attention(text)
        backtrack = 0 if emphasis == "none" else COMMA_BACKTRACK  # "none": plain windows, as 0.1.0 cut them
        length = self.model.config.clip.max_positions - 2
        chunks = self.tokenizer.chunks(pieces, length, backtrack, embeddings=embeddings)
        ids, weights = torch.tensor([c.ids for c in chunks]), torch.tensor([c.weights for c in chunks])
        return ids, weights, [c.fixes for c in chunks]

    def encode_prompt(
        self, text: str, emphasis: str = "original", clip_skip: int = 1, embeddings: tuple[EmbeddingUse, ...] = ()
    ) -> torch.Tensor:
        """(1, 77 * k, width) text embeddings, one 77-token chunk after another; cached per
        (prompt, emphasis, clip skip, embeddings) for this pipeline's model and merged LoRAs.
        `emphasis` is how the weights of `(word:1.2)` apply (see `apply_emphasis`); `clip_skip`
        counts as A1111's "Clip skip"; `embeddings` are those that may trigger in the text."""
        key = (text, emphasis, clip_skip, embeddings)
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        if emphasis not in EMPHASIS:
            raise RequestError(f"emphasis: {emphasis!r} is not one of {', '.join(EMPHASIS)}")
        layers = self.model.config.clip.layers
        if not 1 <= clip_skip <= layers:
            raise RequestError(f"clip_skip: {clip_skip}, but this model's text encoder has {layers} layers")
        ids, weights, fixes = self.prompt_chunks(text, emphasis, self._lookup(embeddings))
        weighted = emphasis not in ("none", "ignore") and bool((weights != 1).any())
        with torch.inference_mode(), self._on_device(self.model.text_encoder) as encoder:
            device = next(encoder.parameters()).device
            z = encoder(ids.to(device), clip_skip, fixes if any(fixes) else None)
            if weighted:
                empty = encoder(self.token_windows("").to(device), clip_skip) if emphasis == "comfy" else None
                z = apply_emphasis(z, weights.to(device), emphasis, empty)
            embedding = z.reshape(1, -1, self.model.config.clip.width).to(self.device)
        self._prompts[key] = embedding
        if len(self._prompts) > PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return embedding

    def _context(self, recipe: Recipe, text: str, embeddings: tuple[EmbeddingUse, ...] = ()) -> torch.Tensor:
        """A recipe's prompt or negative as UNet context, with the recipe's emphasis and clip skip."""
        return self.encode_prompt(text, recipe.emphasis, recipe.clip_skip, embeddings)

    # -- add-ons

    def _addon_file(self, use: LoraUse | EmbeddingUse, read: Callable[[str], Any]) -> Any:
        """A LoRA or embedding file, read once; refused if it is not the file the plan hashed."""
        key = (use.path, use.sha256)
        if key not in self._addon_files:
            for _ in ("before", "after"):  # reading it: the hash is cached by size and mtime, so cheap
                if file_sha256(use.path) != use.sha256:
                    raise RequestError(f"{use.name}: {use.path} changed since the job was planned; plan it again")
                if key not in self._addon_files:
                    self._addon_files[key] = read(use.path)  # read whole: later changes to the file do not matter
        return self._addon_files[key]

    def use_loras(self, loras: Sequence[LoraUse]) -> None:
        """Merge this LoRA set into the weights, unless it is the one merged already (a worker takes
        its batches set by set, so each set is merged once per job). Text embeddings computed with
        other LoRAs are forgotten."""
        key = tuple((u.path, u.sha256, u.te, u.unet) for u in loras)
        if key == self._merged:
            return
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        files: list[tuple[LoraFile, float, float]] = [
            (self._addon_file(u, lambda p: read_lora(p, shapes, self.model.config.unet).loaded()), u.te, u.unet)
            for u in loras
        ]
        self._merged = None  # until the merge succeeds (a failed one restores the plain weights)
        self._prompts.clear()
        self.merger.apply(files)
        self._merged = key

    def _lookup(self, embeddings: tuple[EmbeddingUse, ...]) -> EmbeddingLookup | None:
        if not embeddings:
            return None
        if embeddings not in self._lookups:
            width, chunk = self.model.config.clip.width, self.model.config.clip.max_positions - 2
            read = lambda p: read_embedding(p, width, chunk)  # noqa: E731
            vectors = {u.name: self._addon_file(u, read).vectors for u in embeddings}
            self._lookups[embeddings] = EmbeddingLookup(vectors, self.tokenizer.tokens)
        return self._lookups[embeddings]

    # -- rendering: 1. check the batch, 2. noise sources, 3. start, 4. guidance rows, 5. sample, 6. decode

    @torch.inference_mode()
    def render(self, requests: Sequence[Request]) -> list[Result]:
        if not requests:
            return []
        first = requests[0].recipe
        if any(r.recipe.batch_key() != first.batch_key() for r in requests):
            raise RequestError("a batch must share steps, sampler, karras, size, mode, strength, LoRAs and noise")
        if first.width % self.latent_factor or first.height % self.latent_factor:
            # the UNet takes any latent size; the VAE maps f x f pixels to one latent cell, so
            # another size would come back cropped: refuse it before anything is drawn
            raise RequestError(
                f"size: {first.width}x{first.height} is not a multiple of {self.latent_factor}, "
                f"which this model's VAE needs"
            )
        self.use_loras(requests[0].addons.loras)
        latents = self._sample(requests, [r.recipe for r in requests])
        if first.hires:
            latents = self._second_pass(requests, latents)
        return self._decode(requests, latents)

    def _sample(
        self,
        requests: Sequence[Request],
        recipes: Sequence[Recipe],
        given: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
        base: int | None = None,
    ) -> torch.Tensor:
        """One sampling pass over the batch; its final scaled latents. `recipes` (one per request)
        give the pass's parameters: the requests' own, or their hires second passes. `given` (the
        second pass) makes the scaled latents to start from, given the images' own generators (a
        pixel upscaler's VAE sample draws from them first, as img2img's does); the pass is then
        img2img from them at `strength`, by the compat's rule: diffusers' int(steps * strength) of
        `steps`, or A1111's hires rule, exactly `steps` of a schedule of int(steps / strength); its
        prompt editing counts on from the first pass's `base` model calls, as A1111's does."""
        first = recipes[0]
        sampler = get_sampler(first.sampler)
        # img2img: from an init image, or from the first pass (a hires fix's `strength` is its
        # second pass's: the first pass is txt2img whatever the strength)
        img2img = given is not None or first.init_image is not None
        if given is not None and first.a1111_sigmas:
            total, begin_at = a1111_img2img(first.steps, first.strength, fixed_steps=first.steps)
            schedule, plan = self._plan(replace(first, steps=total))
        else:
            schedule, plan = self._plan(first)
            begin_at = None
        if given is None and first.a1111_sigmas and img2img:
            begin_at = a1111_img2img(first.steps, first.strength)[1]  # A1111's rule: t_enc + 1 steps
        if first.a1111_sigmas and first.sampler in A1111_TIMESTEPS and img2img:
            # A1111's DDIM/PLMS/UniPC: a plan made for the img2img run, noised one grid point above it
            fixed = first.steps if given is not None else None
            plan = timestep_plan(self._ldm[first.downcast_alphas], first.sampler, first.steps, first.strength, fixed)
            begin_at = 0
        shape = (4, first.height // self.latent_factor, first.width // self.latent_factor)
        gens = [torch.Generator().manual_seed(r.seed) for r in recipes]

        def own() -> torch.Tensor:
            """One standard normal latent per image, from that image's own generator (on CPU)."""
            return torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(self.device)

        draw = own if first.rng == "diffusers" else self._a1111_noise(recipes, shape)
        # the VAE posterior's sample: in diffusers' order the first draw of the same generator; A1111
        # draws it from its global generator, which no seed reproduces: here the image's own generator
        if given is None:
            begin = self._start(requests, plan, draw, own, begin_at)
        else:
            begin = start.from_image(plan, draw, given(own), first.steps, first.strength, begin_at)
            if self.inpainting_model:  # A1111's second pass on one: all of it to paint, nothing known
                n, _, h, w = begin.x.shape
                nothing = torch.zeros(n, 3, h * self.latent_factor, w * self.latent_factor, device=self.device)
                everywhere = torch.ones(n, 1, h, w, device=self.device)
                begin.extra_channels = torch.cat([everywhere, self._encode(nothing, own)], dim=1)
        # A1111 counts prompt-editing steps per model call, over 2 x steps for its second-order samplers
        calls = _calls_per_step(first)
        rows = GuidanceRows(
            [r.cfg for r in recipes],
            [
                (self._schedule(q, r, strip_networks(r.prompt), calls, base), self._uncond(q, r, calls, base))
                for q, r in zip(requests, recipes, strict=True)
            ],
            self.device,
        )
        noise: Callable = draw
        if sampler.brownian:  # noise(sigma, sigma_next): A1111's per-image Brownian trees, or plain draws
            seeds = [r.seed for r in recipes]
            if first.rng != "diffusers":  # the trees' normals from A1111's noise source (CUDA's, on any device)
                noise = BrownianNoise(begin.x, seeds, plan.sigmas, source=first.rng)
            else:
                noise = lambda s, n: draw()  # noqa: E731
        model = self._denoiser(rows, begin, schedule, count_calls=calls > 1)
        x = sampler.sample(model, begin.x, begin.plan.sigmas, noise, begin.after_step)
        return begin.plan.to_vp(x)

    def _second_pass(self, requests: Sequence[Request], latents: torch.Tensor) -> torch.Tensor:
        """Hires fix (A1111's `sample_hr_pass`): the first pass's latents upscaled in latent space,
        or decoded to 8-bit images (as A1111 does), upscaled and encoded again; cropped to the
        target for a resize of another aspect; then the second pass, img2img from them."""
        first = requests[0].recipe
        goal, f = first.hires_target(), self.latent_factor
        w, h = goal.cells
        name = first.hires_upscaler
        if hires.is_latent(name):
            _, mode, antialias = hires.LATENT[name]
            upscaled = F.interpolate(latents, size=(h // f, w // f), mode=mode, antialias=antialias)

            def given(own: Callable[[], torch.Tensor]) -> torch.Tensor:
                return self._crop(upscaled, goal.crop)

        else:  # to A1111's unrounded size (665 for 512 x 1.3): the encoder's latents are whole cells of it
            low = self._decode_images(latents)
            use = requests[0].addons.upscaler
            size = goal.upscale
            big = [self._upscale(image, size, name, use) for image in to_pil(low)]
            pixels = torch.cat([image_tensor(image, *size) for image in big]).to(self.device)

            def given(own: Callable[[], torch.Tensor]) -> torch.Tensor:
                return self._encode(pixels, own, goal.crop, keep=goal.cells)

        # A1111 counts the second pass's prompt editing on from the first pass's model calls
        base = first.steps * _calls_per_step(first)
        return self._sample(requests, [r.recipe.second_pass() for r in requests], given, base)

    def _crop(self, latents: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
        """A1111's centred crop of the upscaled latents (`truncate_x/y`, in latent cells)."""
        tx, ty = crop[0] // self.latent_factor, crop[1] // self.latent_factor
        return latents[:, :, ty // 2 : latents.shape[2] - (ty + 1) // 2, tx // 2 : latents.shape[3] - (tx + 1) // 2]

    def _upscale(self, image: Image.Image, size: tuple[int, int], name: str, use: Any) -> Image.Image:
        """A decoded first-pass image brought to `size` as A1111's `resize_image` brings it: "None"
        is one Lanczos resize; its Lanczos and Nearest upscalers resize by the scale, then (Lanczos)
        to whole 8-pixel cells of that, then to `size`; an upscaler model runs tiled until big
        enough, then the same."""
        lanczos = Image.Resampling.LANCZOS
        if name == "none":
            return image.resize(size, lanczos)
        if name in hires.PIXEL:
            scale = max(size[0] / image.width, size[1] / image.height)
            if scale > 1:
                by = (int(image.width * scale), int(image.height * scale))
                image = image.resize(by, Image.Resampling.NEAREST if name == "nearest" else lanczos)
                cells = (by[0] // 8 * 8, by[1] // 8 * 8)
                image = image if image.size == cells else image.resize(cells, lanczos)
            return image if image.size == size else image.resize(size, lanczos)
        if use is None:
            raise RequestError(f"hires upscaler {name!r}: the request names no upscaler file")
        from ..upscale import load_upscaler, upscale_image

        net = self._addon_file(use, lambda path: load_upscaler(path, self.device, self.dtype))
        return upscale_image(net, image, size, tile=self.tuning.upscale_tile)

    def _schedule(
        self, request: Request, recipe: Recipe, text: str, calls: int = 1, base: int | None = None
    ) -> Schedule:
        """The prompt's contexts over the recipe's steps: (end step, context) per stretch of prompt
        editing (A1111's `[from:to:when]`, `[a|b]`); one entry for a prompt without editing. As in
        A1111, an img2img run of the last n of `steps` walks the schedule of all `steps` from its start."""
        embeddings = request.addons.embeddings
        steps = recipe.steps * calls  # `calls`: model calls per step, as A1111 counts them
        pieces = prompt_schedule(text, steps, base)  # base: a hires second pass, after the first's calls
        return [(end, self._context(recipe, part, embeddings)) for end, part in pieces]

    def _uncond(self, request: Request, recipe: Recipe, calls: int = 1, base: int | None = None) -> Schedule | None:
        return None if recipe.cfg == 1 else self._schedule(request, recipe, recipe.negative, calls, base)

    def _plan(self, recipe: Recipe) -> tuple[NoiseSchedule, StepPlan]:
        """The noise schedule and step plan: as diffusers' scheduler for the sampler plans it, or, for
        the k-diffusion samplers, `compat: a1111` and a schedule type, as A1111 plans it (its
        sigmas of the checkpoints' own noise schedule, the timesteps k-diffusion gives the UNet;
        for DDIM, PLMS and UniPC its timestep grid, samplers/timesteps.py)."""
        sampler = get_sampler(recipe.sampler)
        if not recipe.a1111_sigmas:
            return self.schedule, sampler.plan(self.schedule, recipe.steps, recipe.karras)
        ldm = self._ldm[recipe.downcast_alphas]  # the checkpoints' own schedule (fp16 as A1111 ran it before 1.7)
        if recipe.sampler in A1111_TIMESTEPS:  # DDIM, PLMS, UniPC on A1111's grid (txt2img; img2img: _sample)
            return ldm, timestep_plan(ldm, recipe.sampler, recipe.steps)
        kind = "karras" if recipe.karras else recipe.schedule
        if kind == "automatic":
            return ldm, automatic_plan(ldm, recipe.steps, sampler.a1111)
        discard = sampler.a1111 in DISCARD_NEXT_TO_LAST
        return ldm, a1111_plan(ldm, recipe.steps, kind, discard)

    def _a1111_noise(self, recipes: Sequence[Recipe], shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        """A1111's noise for the batch (`noise.a1111.ImageNoise`): the first draw is the initial
        latent noise (variation seed and seed resize applied), each later one a step's noise. Hires
        fix's second pass starts a new one at its own shape from the same seeds, as A1111 does."""
        from ..noise.a1111 import ImageNoise

        r = recipes
        noise = ImageNoise(
            shape,
            [x.seed for x in r],
            [x.subseed for x in r],
            [x.subseed_strength for x in r],
            [x.seed_resize_from for x in r],
            source=r[0].rng,
            ensd=r[0].ensd,
        )
        return lambda: noise.next().to(self.device)

    def _start(
        self,
        requests: Sequence[Request],
        plan,
        draw: Callable[[], torch.Tensor],
        own: Callable[[], torch.Tensor],
        begin_at: int | None = None,
    ) -> start.Start:
        first = requests[0].recipe
        if first.mode == "txt2img" and not self.inpainting_model:
            return start.from_noise(plan, draw)
        w, h = first.width, first.height
        if first.init_image is None:  # txt2img on an inpainting model: everything is to be painted
            images = torch.zeros(len(requests), 3, h, w)
        else:
            images = torch.cat([image_tensor(r.init_image, w, h, r.recipe.resize) for r in requests])
        images = images.to(self.device)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return self._encode(pixels, own)

        if first.mode == "img2img" and not self.inpainting_model:
            return start.from_image(plan, draw, encode(images), first.steps, first.strength, begin_at)
        masks = torch.cat(
            [
                mask_tensor(r.mask, w, h, r.recipe.resize) if r.mask is not None else torch.ones(1, 1, h, w)
                for r in requests
            ]
        ).to(self.device)
        if self.inpainting_model:
            full = first.mode == "txt2img" or (first.mode == "inpaint" and first.strength == 1.0)
            return start.inpaint_model(plan, draw, encode, images, masks, full, first.steps, first.strength, begin_at)
        return start.inpaint(plan, draw, encode, images, masks, first.steps, first.strength, own, begin_at)

    def _encode(
        self,
        images: torch.Tensor,
        draw: Callable[[], torch.Tensor],
        crop: tuple[int, int] = (0, 0),
        keep: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Scaled latents sampled from the VAE posterior, one draw per image from its generator.
        `keep` (w, h pixels): the posterior's first cells covering that much, so an image of A1111's
        unrounded size (665 px) gives the latents of its whole 8-pixel cells (664) whatever the
        VAE's factor (SD's 8 floors there by itself; a 4x VAE would keep 665 // 4 = 166 cells of 4
        where 664 makes 166, but 52 px -> 13 where 48 makes 12); then `crop`, centred (`_crop`)."""
        with self._on_device(self.model.vae) as vae:
            mean, logvar = vae.encode(self._layout(images.to(self.dtype)))
        if keep is not None:
            h, w = keep[1] // self.latent_factor, keep[0] // self.latent_factor
            mean, logvar = mean[:, :, :h, :w], logvar[:, :, :h, :w]
        mean, logvar = self._crop(mean, crop), self._crop(logvar, crop)
        sample = mean.float() + (0.5 * logvar.float()).exp() * draw()
        return sample * self.model.config.vae.scale_factor

    def _unet(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One UNet call; with compile, the first call of each shape is timed (it compiles)."""
        key = (tuple(x_in.shape), tuple(context.shape))
        if not self.tuning.compile or key in self.compile_seconds:
            return self.unet(x_in, t, context)
        began = time.perf_counter()
        out = self.unet(x_in, t, context)
        self.compile_seconds[key] = time.perf_counter() - began
        return out

    def _denoiser(
        self, rows: GuidanceRows, begin: start.Start, schedule: NoiseSchedule, count_calls: bool = False
    ) -> Callable[..., torch.Tensor]:
        """denoised = model(x, i[, sigma]): the guided estimate of the clean latents at step i, at
        the plan's sigma for that step, or at `sigma` (samplers that evaluate between steps; the
        UNet is told the fractional timestep of that sigma, as k-diffusion tells it). With
        `count_calls`, prompt editing follows the number of model calls so far, as A1111's
        CFGDenoiser counts them, instead of the step."""
        plan, extra_channels = begin.plan, begin.extra_channels
        made = [0]  # model calls so far

        def model(x: torch.Tensor, i: int, at: torch.Tensor | None = None) -> torch.Tensor:
            sigma = (plan.sigmas[i] if at is None else at).to(self.device)
            x_in = x / (sigma**2 + 1).sqrt()
            if extra_channels is not None:
                x_in = torch.cat([x_in, extra_channels], dim=1)
            t = plan.timesteps[i].to(self.device) if at is None else sigma_to_t(schedule, sigma.float())

            def run(latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
                return self._unet(self._layout(latents.to(self.dtype)), t.expand(len(latents)), context)

            step = made[0] if count_calls else i
            made[0] += 1
            return x - sigma * rows.eps(x, x_in, run, step)

        return model

    def _decode_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in [-1, 1] (float32), in the VAE's dtype of the moment, vae_batch
        at a time and in tiles where the size asks for them. The fp32 fallback comes through here
        too, so that it keeps the tiling (the picture) and the memory bound of the first try."""
        dtype = next(vae.parameters()).dtype

        def decode(part: torch.Tensor) -> torch.Tensor:
            return vae.decode(self._layout(part.to(dtype))).float()

        f = self.latent_factor
        auto = hires.auto_vae_tile((z.shape[-1] * f, z.shape[-2] * f))
        tile = self.tuning.vae_tile or (auto // f if auto else None)
        step = self.tuning.vae_batch or len(z)
        parts = [z[i : i + step] for i in range(0, len(z), step)]
        if tile is None or max(z.shape[-2:]) <= tile:
            return torch.cat([decode(part) for part in parts])
        return torch.cat([tiled_decode(decode, part, tile, max(1, tile // 4), f) for part in parts])

    def _decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32)."""
        z = latents / self.model.config.vae.scale_factor
        with self._on_device(self.model.vae) as vae:
            images = self._decode_latents(vae, z)
            bad = ~torch.isfinite(images).flatten(1).all(dim=1)
            if bad.any() and self.dtype != torch.float32:
                # fp16 activations can overflow in the VAE's last up-blocks: decode those in fp32
                with upcast(vae):
                    images[bad] = self._decode_latents(vae, z[bad])
        return images

    def _decode(self, requests: Sequence[Request], latents: torch.Tensor) -> list[Result]:
        images = self._decode_images(latents)
        finite_latents = torch.isfinite(latents).flatten(1).all(dim=1)
        results: list[Result] = []
        for k, r in enumerate(requests):
            final = latents[k].cpu()
            if not finite_latents[k]:
                results.append(Result(r, None, "NaN or inf in the latents after sampling", final))
            elif not torch.isfinite(images[k]).all():
                results.append(Result(r, None, "NaN or inf in the decoded image", final))
            else:
                results.append(Result(r, to_pil(images[k : k + 1])[0], None, final))
        return results
