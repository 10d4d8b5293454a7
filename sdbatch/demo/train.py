"""Train the shipped demo model: `python -m sdbatch.demo.train`.

Same classes, checkpoint layout and loader as SD 1.5, only a smaller config:
  1. the VAE learns to reconstruct dataset images (L1 + a tiny KL, as LDM's first stage minus the
     GAN); the latent scale factor is then set so that latents have unit variance, as 0.18215 does
     for SD;
  2. the text encoder and UNet learn to predict the noise (DDPM, Algorithm 1) on SD's own noise
     schedule, with 10% of captions dropped to "" so that classifier-free guidance works.

Deterministic given --seed: every step's images, timesteps and noise derive from (seed, phase,
step), so a run resumed from its state file ends with the same weights as one that never stopped.
Writes `<out>/model.safetensors` (fp16, our config and recommended CFG in its header) and
`<out>/tokenizer/`; `weights/demo/README.md` says how the shipped copy was trained.
"""

import argparse
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..checkpoints import DEFAULTS_METADATA_KEY, save_checkpoint
from ..files import write_atomic
from ..models import CONFIGS, SDConfig, StableDiffusion, build_model
from ..samplers import NoiseSchedule
from ..tokenizer import Tokenizer
from . import data
from . import tokenizer as demo_tokenizer

CAPTION_DROPOUT = 0.1
# What the model's header recommends to jobs that set no `cfg`. Measured on the shipped model (192
# grid images, 30 steps euler_a): colour/shape adherence 100%/96% at CFG 4 but 79%/91% at 7.5,
# where this small model over-saturates (README, "The demo model").
RECOMMENDED = {"cfg": 4.0}
KL_WEIGHT = 1e-6


def batch(seed: int, phase: str, step: int, size: int, side: int) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] and captions for one step; a function of its arguments alone."""
    base = random.Random(f"{seed}/{phase}/{step}").randrange(2**62)
    images, captions = [], []
    for k in range(size):
        image, caption, _ = data.sample(base + k, side)
        images.append(np.asarray(image, dtype=np.float32))
        captions.append(caption)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1, captions


def generator(seed: int, phase: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(random.Random(f"{seed}/{phase}/{step}/noise").randrange(2**62))


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.state_file = self.work / "state.pt"
        torch.manual_seed(args.seed)
        tok_dir = self.work / "tokenizer"
        if not (args.resume and (tok_dir / "vocab.json").is_file()):
            demo_tokenizer.write(tok_dir)
        from transformers import CLIPTokenizer

        self.tokenizer = Tokenizer(CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True), str(tok_dir))
        self.config: SDConfig = CONFIGS[args.config]
        self.model: StableDiffusion = build_model(self.config)
        self.schedule = NoiseSchedule()
        self.phase, self.step = "vae", 0
        self.vae_opt = torch.optim.AdamW(self.model.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        diffusion_params = [*self.model.unet.parameters(), *self.model.text_encoder.parameters()]
        self.diffusion_opt = torch.optim.AdamW(diffusion_params, lr=args.lr, weight_decay=0.01)
        if args.resume and self.state_file.exists():
            self.load_state()

    # -- state

    def save_state(self) -> None:
        state = {
            "phase": self.phase,
            "step": self.step,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "diffusion_opt": self.diffusion_opt.state_dict(),
            "args": {k: v for k, v in vars(self.args).items() if k not in ("resume", "out", "work")},
        }
        self.work.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_file, lambda tmp: torch.save(state, tmp))

    def load_state(self) -> None:
        state = torch.load(self.state_file, weights_only=True)
        args = {k: v for k, v in vars(self.args).items() if k not in ("resume", "out", "work")}
        if state["args"] != args:
            raise SystemExit(
                f"{self.state_file} was written with other settings {state['args']}; "
                "start without --resume or with the same options"
            )
        self.config = SDConfig.from_dict(state["config"])
        self.model = build_model(self.config)
        self.model.load_state_dict(state["model"])
        self.vae_opt = torch.optim.AdamW(self.model.vae.parameters(), lr=self.args.vae_lr, weight_decay=0.0)
        params = [*self.model.unet.parameters(), *self.model.text_encoder.parameters()]
        self.diffusion_opt = torch.optim.AdamW(params, lr=self.args.lr, weight_decay=0.01)
        for optimizer, saved in ((self.vae_opt, state["vae_opt"]), (self.diffusion_opt, state["diffusion_opt"])):
            optimizer.load_state_dict(saved)
            # fresh, aligned copies: tensors read by torch.load can sit at offsets for which CPU kernels
            # take other (FMA vs scalar) paths, and the resumed run would drift from the uninterrupted one
            for values in optimizer.state.values():
                for name, value in values.items():
                    values[name] = value.clone()
        self.phase, self.step = state["phase"], state["step"]

    # -- phases

    def lr_at(self, base: float, step: int, total: int) -> float:
        warmup = max(1, total // 20)
        if step < warmup:
            return base * (step + 1) / warmup
        # a Python float: numpy scalars in the optimizer state would not load with weights_only=True
        return float(base * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup))))

    def vae_step(self) -> float:
        a = self.args
        images, _ = batch(a.seed, "vae", self.step, a.vae_batch, a.side)
        vae = self.model.vae
        mean, logvar = vae.encode(images)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator(a.seed, "vae", self.step))
        recon = vae.decode(z)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + KL_WEIGHT * kl
        for group in self.vae_opt.param_groups:
            group["lr"] = self.lr_at(a.vae_lr, self.step, a.vae_steps)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        return loss.item()

    @torch.no_grad()
    def set_scale_factor(self) -> None:
        """Latents times this have unit standard deviation (SD's 0.18215 was found the same way)."""
        images, _ = batch(self.args.seed, "scale", 0, 256, self.args.side)
        mean, _ = self.model.vae.encode(images)
        scale = float(1.0 / mean.std())
        self.config = replace(self.config, vae=replace(self.config.vae, scale_factor=round(scale, 5)))
        self.model.config = self.config
        self.model.vae.config = self.config.vae

    def diffusion_step(self) -> float:
        a = self.args
        images, captions = batch(a.seed, "unet", self.step, a.batch, a.side)
        g = generator(a.seed, "unet", self.step)
        with torch.no_grad():
            mean, logvar = self.model.vae.encode(images)
            z = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)) * self.config.vae.scale_factor
        drop = torch.rand(len(captions), generator=g) < CAPTION_DROPOUT
        length = self.config.clip.max_positions
        ids = torch.stack([self.tokenizer.encode("" if d else c, length) for c, d in zip(captions, drop, strict=True)])
        t = torch.randint(0, self.schedule.train_steps, (len(captions),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a_t = self.schedule.alphas_cumprod[t][:, None, None, None]
        x_t = a_t.sqrt() * z + (1 - a_t).sqrt() * noise
        eps = self.model.unet(x_t, t, self.model.text_encoder(ids))
        loss = F.mse_loss(eps, noise)
        for group in self.diffusion_opt.param_groups:
            group["lr"] = self.lr_at(a.lr, self.step, a.steps)
        self.diffusion_opt.zero_grad(set_to_none=True)
        loss.backward()
        # only what this phase trains: stale VAE gradients must not weigh in the norm
        torch.nn.utils.clip_grad_norm_([*self.model.unet.parameters(), *self.model.text_encoder.parameters()], 1.0)
        self.diffusion_opt.step()
        return loss.item()

    def run_phase(self, progress, label: str, total: int, step: Callable[[], float]) -> None:
        """Steps of one phase from where the state left off, saved every `save_every` steps."""
        task = progress.add_task(label, total=total, completed=self.step, loss=0.0)
        while self.step < total:
            loss = step()
            self.step += 1
            self.report(progress, task, loss)
            if self.step % self.args.save_every == 0:
                self.save_state()

    def report(self, progress: Progress, task: int, loss: float) -> None:
        """The bar on a terminal; a plain line every 50 steps elsewhere (nohup, CI logs)."""
        progress.update(task, advance=1, loss=loss)
        if not progress.console.is_terminal and not self.args.quiet and self.step % 50 == 0:
            print(f"{self.phase} step {self.step} loss {loss:.4f}", flush=True)

    def run(self) -> Path:
        started = time.monotonic()
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, disable=self.args.quiet) as progress:
            if self.phase == "vae":
                self.model.vae.train()
                self.run_phase(progress, "VAE", self.args.vae_steps, self.vae_step)
                self.vae_opt.zero_grad(set_to_none=True)
                self.set_scale_factor()
                self.phase, self.step = "unet", 0
                self.save_state()
            self.model.vae.eval().requires_grad_(False)
            self.model.unet.train()
            self.model.text_encoder.train()
            self.run_phase(progress, "UNet + text encoder", self.args.steps, self.diffusion_step)
        self.save_state()
        return self.export(time.monotonic() - started)

    def export(self, seconds: float) -> Path:
        """The shipped files: fp16 weights in the single-file layout (with our config), the tokenizer."""
        self.model.eval()
        half = build_model(self.config)
        half.load_state_dict(self.model.state_dict())
        path = save_checkpoint(
            half.half(),
            self.out / "model.safetensors",
            metadata={
                "sdbatch.training": json.dumps(vars(self.args) | {"seconds": round(seconds)}),
                DEFAULTS_METADATA_KEY: json.dumps(RECOMMENDED),
            },
        )
        # the very files the text encoder was trained with, copied rather than rebuilt
        shutil.copytree(self.work / "tokenizer", self.out / "tokenizer", dirs_exist_ok=True)
        return path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdbatch.demo.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="weights/demo", help="where the shipped files go")
    p.add_argument("--work", default="outputs/demo-train", help="training state (for --resume)")
    p.add_argument("--config", default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", type=int, default=32, help="image side in pixels")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=2400, help="UNet + text encoder steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from <work>/state.pt")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    path = Trainer(args).run()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.parent / 'tokenizer'}/")


if __name__ == "__main__":
    main()
