"""txt2img, img2img and inpainting with classifier-free guidance, for a batch of requests at once.

Determinism: every random draw for an image (the VAE's latent sample, the initial noise, each
ancestral step's noise) comes from a CPU `torch.Generator` seeded with that image's seed alone, in
the order diffusers uses with a list of CPU generators. So an image does not change with the batch
it is in, its position, or the device; and it equals diffusers' image for the same seed and weights.
"""

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import load_model, resolve_model
from .errors import InputError
from .models import StableDiffusion
from .samplers import NoiseSchedule, Plan, get_sampler, img2img_start
from .tokenizer import Tokenizer, load_tokenizer

ASPECT_TOLERANCE = 0.01  # init images whose aspect differs more than this are refused, not stretched
PROMPT_CACHE_SIZE = 1024


class RequestError(InputError):
    """A request that cannot be rendered as given; the message says which field and why."""


@dataclass(frozen=True)
class Request:
    prompt: str
    negative: str = ""  # the unconditional prompt of classifier-free guidance
    seed: int = 0
    steps: int = 30
    sampler: str = "euler_a"
    karras: bool = False
    cfg: float = 7.5
    width: int = 512
    height: int = 512
    init_image: Image.Image | None = field(default=None, compare=False)
    mask: Image.Image | None = field(default=None, compare=False)  # white = repaint
    strength: float = 0.75  # img2img / inpainting: how much of the schedule is re-run

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                raise RequestError(f"{name} must be a positive multiple of 8, got {value}")
        if self.steps < 1:
            raise RequestError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise RequestError(f"strength must be in (0, 1], got {self.strength}")
        if self.mask is not None and self.init_image is None:
            raise RequestError("a mask needs an init_image to repaint")
        if not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must be in [0, 2**64), got {self.seed}")
        try:
            get_sampler(self.sampler).check(self.karras)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if self.init_image is not None and int(self.steps * self.strength) < 1:
            raise RequestError(
                f"strength {self.strength} of {self.steps} steps runs no step at all; raise strength or steps"
            )

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    def batch_key(self) -> tuple:
        """Requests with equal keys share every UNet call; prompts, seeds and CFG may differ."""
        strength = self.strength if self.init_image is not None else None
        return (self.steps, self.sampler, self.karras, self.width, self.height, self.mode, strength)


@dataclass
class Result:
    request: Request
    image: Image.Image | None
    error: str | None = None  # why no image: NaN/inf latents, say
    latents: torch.Tensor | None = field(default=None, repr=False)  # (4, h, w) final scaled latents, on CPU

    @property
    def ok(self) -> bool:
        return self.image is not None


# ----------------------------------------------------------------------------------------------------
# init images and masks


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency flattened onto white, 16-bit scaled (not clipped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values / 65535 * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def fit(image: Image.Image, width: int, height: int, what: str) -> Image.Image:
    """Resize to the requested size when only the scale differs; refuse a different aspect ratio,
    since stretching or cropping it silently would change the picture the user asked for."""
    if image.size == (width, height):
        return image
    w, h = image.size
    if abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise RequestError(
            f"{what} is {w}x{h} but the size asked for is {width}x{height}: the aspect ratios differ, and sdbatch "
            f"never crops or stretches silently. Crop the image, or ask for a size of the same shape "
            f"(e.g. [{w // 8 * 8}, {h // 8 * 8}])"
        )
    return image.resize((width, height), Image.Resampling.LANCZOS)


def image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]; the caller's image is never modified."""
    rgb = fit(to_rgb(image), width, height, "init_image")
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def mask_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 1, H, W) of 0/1: white (>= 50% grey) is repainted, as in diffusers and A1111."""
    grey = fit(to_rgb(mask).convert("L"), width, height, "mask")
    return (torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0) >= 0.5).float()[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit RGB, rounding as diffusers does."""
    array = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in array]


# ----------------------------------------------------------------------------------------------------
# the pipeline


@dataclass(frozen=True)
class FastPath:
    """Speed options; none of them changes what an image shows (beyond float rounding, tested).

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


class Pipeline:
    """One model on one device; `render` takes a list of compatible requests (see Request.batch_key)."""

    def __init__(
        self,
        model: StableDiffusion,
        tokenizer: Tokenizer,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        fast: FastPath = FastPath(),
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.fast = fast
        self.model = model.eval().requires_grad_(False)
        idle = torch.device("cpu") if fast.low_vram else self.device
        self.model.unet.to(device=self.device, dtype=dtype)
        self.model.vae.to(device=idle, dtype=dtype)
        self.model.text_encoder.to(device=idle, dtype=dtype)
        if fast.channels_last:
            self.model.unet.to(memory_format=torch.channels_last)
            self.model.vae.to(memory_format=torch.channels_last)
        self.unet: Callable = self.model.unet
        if fast.compile:
            mode = "reduce-overhead" if fast.cuda_graphs and self.device.type == "cuda" else None
            self.unet = torch.compile(self.model.unet, dynamic=False, mode=mode)
        self.compile_seconds: dict[tuple, float] = {}  # batch shape -> first call (compile) time
        self.tokenizer = tokenizer
        self.schedule = NoiseSchedule()
        self.latent_factor = 2 ** (len(model.config.vae.ch_mult) - 1)
        self._prompts: OrderedDict[str, torch.Tensor] = OrderedDict()

    @contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """With low_vram, a module visits the device only while it runs."""
        if not self.fast.low_vram or self.device.type == "cpu":
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        vae: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        fast: FastPath = FastPath(),
    ) -> "Pipeline":
        path = resolve_model(path)  # a file, a folder, or a name such as "demo"
        load_to = "cpu" if fast.low_vram else device
        loaded = load_model(path, vae=vae, device=load_to, dtype=dtype)
        tokenizer = load_tokenizer(path, vocab_size=loaded.config.clip.vocab_size)
        return cls(loaded.model, tokenizer, device, dtype, fast)

    # -- prompts

    def token_windows(self, text: str) -> torch.Tensor:
        """(k, 77) ids: the prompt cut into 75-token windows (for SD's 77 positions), each framed by
        start/end tokens and padded with the end token: long prompts are encoded whole, never cut."""
        ids = self.tokenizer.tokens(text)
        chunk = self.model.config.clip.max_positions - 2  # 75 for SD; smaller for the demo model
        windows = [ids[i : i + chunk] for i in range(0, len(ids), chunk)] or [[]]
        bos, eos = self.tokenizer.bos, self.tokenizer.eos
        return torch.tensor([[bos, *w, eos] + [eos] * (chunk - len(w)) for w in windows], dtype=torch.long)

    def encode_prompt(self, text: str) -> torch.Tensor:
        """(1, 77 * k, width) text embeddings, cached per prompt for this pipeline's model."""
        if text in self._prompts:
            self._prompts.move_to_end(text)
            return self._prompts[text]
        with torch.inference_mode(), self._on_device(self.model.text_encoder) as encoder:
            windows = self.token_windows(text).to(next(encoder.parameters()).device)
            embedding = encoder(windows).reshape(1, -1, self.model.config.clip.width).to(self.device)
        self._prompts[text] = embedding
        if len(self._prompts) > PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return embedding

    def _decode_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        def decode(part: torch.Tensor) -> torch.Tensor:
            return vae.decode(self._layout(part.to(self.dtype))).float()

        tile = self.fast.vae_tile
        if tile is None or max(z.shape[-2:]) <= tile:
            return decode(z)
        return tiled_decode(decode, z, tile, max(1, tile // 4), self.latent_factor)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.fast.channels_last else x

    # -- rendering

    @torch.inference_mode()
    def render(self, requests: Sequence[Request]) -> list[Result]:
        if not requests:
            return []
        first = requests[0]
        if any(r.batch_key() != first.batch_key() for r in requests):
            raise RequestError("a batch must share steps, sampler, karras, size, mode and strength")
        sampler = get_sampler(first.sampler)
        plan = sampler.plan(self.schedule, first.steps, first.karras)
        shape = (4, first.height // self.latent_factor, first.width // self.latent_factor)
        gens = [torch.Generator().manual_seed(r.seed) for r in requests]

        def draw() -> torch.Tensor:
            """One standard normal latent per image, from that image's own generator (on CPU)."""
            return torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(self.device)

        nine = self.model.config.unet.in_channels == 9
        extra, after_step = None, None
        if first.mode == "txt2img" and not nine:
            x = draw() * plan.initial_noise_scale()
        else:
            x, plan, extra, after_step = self._prepare_image(requests, plan, draw, nine)

        denoise = self._denoiser(requests, plan, extra)
        x = sampler.sample(denoise, x, plan.sigmas, draw, after_step)
        return self._decode(requests, plan.to_vp(x))

    def _prepare_image(self, requests: Sequence[Request], plan: Plan, draw: Callable[[], torch.Tensor], nine: bool):
        """Starting latents for img2img / inpainting, the extra UNet channels of a 9-channel model,
        and the step hook that puts the known region back for inpainting with a normal model."""
        first = requests[0]
        w, h = first.width, first.height
        if first.init_image is None:  # txt2img on an inpainting model: everything is to be painted
            images = torch.zeros(len(requests), 3, h, w)
        else:
            images = torch.cat([image_tensor(r.init_image, w, h) for r in requests])
        masks = torch.cat(
            [mask_tensor(r.mask, w, h) if r.mask is not None else torch.ones(1, 1, h, w) for r in requests]
        )
        images, masks = images.to(self.device), masks.to(self.device)
        full_strength = first.mode == "txt2img" or (first.mode == "inpaint" and first.strength == 1.0)

        latents = None
        if first.init_image is not None and (not full_strength or (first.mode == "inpaint" and not nine)):
            latents = self._encode(images, draw)
        noise = draw()
        if first.init_image is not None and not full_strength:
            plan = plan.from_step(img2img_start(first.steps, first.strength))
            x = latents + noise * plan.sigmas[0]
        else:
            x = noise * plan.initial_noise_scale()

        extra, after_step = None, None
        if first.mode == "inpaint" or nine:
            small = F.interpolate(masks, size=tuple(x.shape[-2:]))
            if nine:
                extra = torch.cat([small, self._encode(images * (masks < 0.5), draw)], dim=1)
            else:
                # diffusers encodes the masked image for 4-channel models too and never uses it; its
                # sample draw is made here as well so that every later draw (and image) lines up
                draw()
                last = len(plan) - 1

                def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
                    sigma = plan.sigmas[i + 1]
                    # the known region at the new noise level; exact (no noise) after the last step
                    known = latents + noise * sigma if i < last else latents * (sigma**2 + 1).sqrt()
                    return (1 - small) * known + small * x

        return x, plan, extra, after_step

    def _encode(self, images: torch.Tensor, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Scaled latents sampled from the VAE posterior, one draw per image from its generator."""
        with self._on_device(self.model.vae) as vae:
            mean, logvar = vae.encode(self._layout(images.to(self.dtype)))
        sample = mean.float() + (0.5 * logvar.float()).exp() * draw()
        return sample * self.model.config.vae.scale_factor

    def _denoiser(self, requests: Sequence[Request], plan: Plan, extra: torch.Tensor | None):
        """denoised = model(x, i) with classifier-free guidance; cond and uncond rows share UNet calls
        (CFG 1 needs no uncond row). Rows are grouped by prompt length, since a long prompt's context
        is longer: padding it instead would change images depending on their batch-mates."""
        contexts: list[torch.Tensor] = []  # one UNet row each
        owner: list[int] = []  # the request (latent) each row belongs to
        for k, r in enumerate(requests):
            prompts = [r.prompt] if r.cfg == 1 else [r.prompt, r.negative]
            contexts += [self.encode_prompt(p) for p in prompts]
            owner += [k] * len(prompts)
        first_row = [owner.index(k) for k in range(len(requests))]  # cond row; uncond follows if guided
        guided = [k for k, r in enumerate(requests) if r.cfg != 1]
        cond_rows = torch.tensor(first_row, device=self.device)
        uncond_rows = torch.tensor([first_row[k] + 1 for k in guided], dtype=torch.long, device=self.device)
        scales = torch.tensor([requests[k].cfg for k in guided], device=self.device)[:, None, None, None]
        groups: dict[int, list[int]] = {}
        for n, context in enumerate(contexts):
            groups.setdefault(context.shape[1], []).append(n)
        batches = [
            (
                torch.tensor(rows, device=self.device),
                torch.tensor([owner[n] for n in rows], device=self.device),
                torch.cat([contexts[n] for n in rows]),
            )
            for rows in groups.values()
        ]

        def unet(x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            key = (tuple(x_in.shape), tuple(context.shape))
            if not self.fast.compile or key in self.compile_seconds:
                return self.unet(x_in, t, context)
            start = time.perf_counter()
            out = self.unet(x_in, t, context)
            self.compile_seconds[key] = time.perf_counter() - start
            return out

        def model(x: torch.Tensor, i: int) -> torch.Tensor:
            sigma = plan.sigmas[i].to(self.device)
            x_in = x / (sigma**2 + 1).sqrt()
            if extra is not None:
                x_in = torch.cat([x_in, extra], dim=1)
            t = plan.timesteps[i].to(self.device)
            eps_rows = x.new_empty((len(contexts), *x.shape[1:]))
            for rows, latents, context in batches:
                eps_rows[rows] = unet(self._layout(x_in[latents].to(self.dtype)), t.expand(len(rows)), context).float()
            eps = eps_rows[cond_rows]
            if guided:
                uncond = eps_rows[uncond_rows]
                eps[guided] = uncond + scales * (eps[guided] - uncond)
            return x - sigma * eps

        return model

    def _decode(self, requests: Sequence[Request], latents: torch.Tensor) -> list[Result]:
        results: list[Result] = []
        z = latents / self.model.config.vae.scale_factor
        step = self.fast.vae_batch or len(z)
        with self._on_device(self.model.vae) as vae:
            images = torch.cat([self._decode_latents(vae, z[i : i + step]) for i in range(0, len(z), step)])
            bad = ~torch.isfinite(images).flatten(1).all(dim=1)
            if bad.any() and self.dtype != torch.float32:
                # fp16 activations can overflow in the VAE's last up-blocks: decode those in fp32
                with upcast(vae):
                    images[bad] = vae.decode(z[bad].float()).float()
        finite_latents = torch.isfinite(latents).flatten(1).all(dim=1)
        for k, r in enumerate(requests):
            final = latents[k].cpu()
            if not finite_latents[k]:
                results.append(Result(r, None, "NaN or inf in the latents after sampling", final))
            elif not torch.isfinite(images[k]).all():
                results.append(Result(r, None, "NaN or inf in the decoded image", final))
            else:
                results.append(Result(r, to_pil(images[k : k + 1])[0], None, final))
        return results


def tiled_decode(decode: Callable, z: torch.Tensor, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """Decode (B, C, h, w) latents tile by tile: tiles of `tile` cells start every tile - overlap
    cells, and each is blended into its upper and left neighbours over the overlap (in pixels), then
    cut to its stride. diffusers' AutoencoderKL.tiled_decode scheme, without its sliver tiles."""
    stride, blend = tile - overlap, overlap * factor
    # a tile starts only where the one before it stops short of the edge: no sliver tiles
    starts_y = range(0, max(1, z.shape[-2] - overlap), stride)
    starts_x = range(0, max(1, z.shape[-1] - overlap), stride)
    rows = [[decode(z[:, :, i : i + tile, j : j + tile]) for j in starts_x] for i in starts_y]
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, part in enumerate(row):
            if i > 0:
                above = rows[i - 1][j]
                n = min(blend, above.shape[2], part.shape[2])
                w = torch.linspace(0, 1, n + 1, device=part.device)[:n].view(1, 1, n, 1)
                part[:, :, :n] = above[:, :, -n:] * (1 - w) + part[:, :, :n] * w
            if j > 0:
                left = row[j - 1]
                n = min(blend, left.shape[3], part.shape[3])
                w = torch.linspace(0, 1, n + 1, device=part.device)[:n].view(1, 1, 1, n)
                part[:, :, :, :n] = left[:, :, :, -n:] * (1 - w) + part[:, :, :, :n] * w
            height = stride * factor if i < len(rows) - 1 else part.shape[2]  # the last tile keeps it all
            width = stride * factor if j < len(row) - 1 else part.shape[3]
            parts.append(part[:, :, :height, :width])
        out_rows.append(torch.cat(parts, dim=3))
    return torch.cat(out_rows, dim=2)


@contextmanager
def upcast(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a module in float32 for a moment, then give it back its dtype (exact for fp16/bf16 weights)."""
    dtype = next(module.parameters()).dtype
    try:
        yield module.float()
    finally:
        module.to(dtype)
