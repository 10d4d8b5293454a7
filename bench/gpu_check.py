"""The GPU session's correctness checks (issue 17 item 1, and item 4's CUDA noise), in one call.

No GPU has run sdbatch yet, and a session is lent one for minutes: this script is prepared so that
those minutes go to running, not writing. On the device (see bench/GPU.md for the whole call):

    python3 bench/gpu_check.py --out $OUT          # every check; about 5 minutes on an H100
    python3 bench/gpu_check.py --smoke             # the CPU, tiny: proves the script runs (a test runs it)

Each check prints `PASS|FAIL|ERROR|SKIP name: figures` and appends it to OUT/gpu_check.md at once, so
a timeout keeps what ran; one check failing does not stop the others. Exit 1 if any failed.
"""

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # sdbatch is not installed on the device machine
from helpers import request  # noqa: E402

from sdbatch.models import build_model  # noqa: E402
from sdbatch.noise import philox  # noqa: E402
from sdbatch.pipeline import Pipeline, Tuning  # noqa: E402
from sdbatch.render.devices import with_backoff  # noqa: E402
from sdbatch.tokenizer import Tokenizer, bundled_tokenizer  # noqa: E402

# (seed, shape) pairs whose first torch.randn draws on CUDA become test vectors (tests/test_noise.py);
# each under the GPU's resident threads (philox.py): (4, 64, 64) is SD's 512x512 latent
RANDN_CASES = [(0, (4, 8, 8)), (1, (4, 64, 64)), (42, (3, 5, 7)), (31337, (4, 64, 64)), (2**32 + 5, (2, 4, 64, 96))]


PLAIN = Tuning()


class Report:
    def __init__(self, out: Path):
        self.out = out
        self.failed = False
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu_check.md"
        self.path.write_text("")

    def line(self, status: str, name: str, text: str) -> None:
        self.failed |= status in ("FAIL", "ERROR")
        entry = f"{status} {name}: {text}"
        print(entry, flush=True)
        with self.path.open("a") as f:
            f.write(entry + "\n")

    def run(self, name: str, check: Callable[[], tuple[bool, str]]) -> None:
        start = time.perf_counter()
        try:
            ok, text = check()
        except SkipCheck as e:
            self.line("SKIP", name, str(e))
            return
        except Exception as e:
            self.line("ERROR", name, f"{type(e).__name__}: {e}".replace("\n", " ")[:500])
            traceback.print_exc()
            return
        self.line("PASS" if ok else "FAIL", name, f"{text} ({time.perf_counter() - start:.0f} s)")


class SkipCheck(Exception):
    pass


def cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        raise SkipCheck("needs CUDA")


def pixels(results) -> np.ndarray:
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return np.stack([np.asarray(r.image, dtype=np.float64) for r in results])


def peak_reset(device: torch.device) -> None:
    gc.collect()  # pipelines of earlier checks must not count in this one's peak
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


class Checks:
    def __init__(self, device: torch.device, half: torch.dtype, smoke: bool, out: Path):
        self.device, self.half, self.smoke, self.out = device, half, smoke, out
        self.big = "tiny" if smoke else "sd15"  # random SD1.5-size weights (the sizes are what matter)
        self.big_size = 64 if smoke else 512

    def demo(self, dtype: torch.dtype, tuning: Tuning = PLAIN) -> Pipeline:
        return Pipeline.from_file("demo", device=self.device, dtype=dtype, tuning=tuning)

    def random_model(self, dtype: torch.dtype, tuning: Tuning = PLAIN) -> Pipeline:
        torch.manual_seed(0)
        return Pipeline(build_model(self.big), Tokenizer(bundled_tokenizer(), "bundled"), self.device, dtype, tuning)

    def env(self) -> tuple[bool, str]:
        text = f"torch {torch.__version__}"
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            text += f", CUDA {torch.version.cuda}, {props.name}, {props.total_memory / 2**30:.0f} GiB"
            with contextlib.suppress(Exception):
                smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
                text += f", driver {subprocess.run(smi, capture_output=True, text=True).stdout.strip()}"
        with contextlib.suppress(ImportError):
            import diffusers

            text += f", diffusers {diffusers.__version__}"
        return True, text

    def randn(self) -> tuple[bool, str]:
        """torch.randn on CUDA against our CPU port of its Philox, and the values kept as test vectors."""
        cuda_only(self.device)
        vectors, worst = [], 0.0
        for seed, shape in RANDN_CASES:
            g = torch.Generator("cuda").manual_seed(seed)
            for draw in range(2):
                theirs = torch.randn(shape, generator=g, device="cuda").cpu().numpy()
                ours = philox.cuda_randn(seed, shape, draw)
                worst = max(worst, float(np.abs(theirs - ours).max()))
                vectors.append(
                    {"seed": seed, "shape": list(shape), "draw": draw, "values": theirs.ravel()[:16].tolist()}
                )
        (self.out / "cuda_randn.json").write_text(json.dumps(vectors, indent=1))
        return worst <= 1e-5, f"{len(vectors)} draws, worst |CUDA - port| {worst:.2e}; values in cuda_randn.json"

    def renders(self) -> tuple[bool, str]:
        """The demo in fp32 and in half over several features, and random SD1.5 weights in half: no
        NaN, and half close to fp32 (mean |diff| well under the distance to the next seed's image)."""
        features = [{}, {"sampler": "dpmpp_2m", "schedule": "karras"}, {"compat": "a1111", "rng": "a1111"}]
        groups = [
            [request("a big red circle", seed=s, steps=8, width=32, height=32, **f) for s in (1, 2)] for f in features
        ]

        def render(pipe: Pipeline) -> np.ndarray:  # a batch shares its sampler: one per feature
            return np.concatenate([pixels(pipe.render(group)) for group in groups])

        ref, parts = render(self.demo(torch.float32)), []
        ok = True
        for dtype in dict.fromkeys((self.half, torch.bfloat16)):
            half = render(self.demo(dtype))
            error = np.abs(half - ref).mean()
            spread = np.abs(ref[0::2] - ref[1::2]).mean()  # seed 1 against seed 2
            ok &= bool(error < 0.5 * spread)
            parts.append(f"demo {str(dtype)[6:]} mean |diff| {error:.2f} (next seed {spread:.2f})")
        big = self.random_model(self.half).render(
            [request("a lighthouse", seed=1, steps=4, width=self.big_size, height=self.big_size)]
        )[0]
        ok &= big.ok
        parts.append(f"{self.big} {self.big_size}px {str(self.half)[6:]}: {'ok' if big.ok else big.error}")
        return ok, "; ".join(parts)

    def vae_overflow(self) -> tuple[bool, str]:
        """A real fp16 overflow in the VAE (latents scaled up until the half decode gives inf) is
        decoded again in fp32: the image comes out finite and close to a plain fp32 decode."""
        cuda_only(self.device)
        pipe, full = self.demo(torch.float16), self.demo(torch.float32)
        z0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).to(self.device)
        for scale in (10, 100, 1e3, 1e4):
            z = z0 * scale
            with torch.inference_mode():
                first = pipe.model.vae.decode((z / pipe.model.config.vae.scale_factor).half()).float()
                if torch.isfinite(first).all():
                    continue
                fixed, ref = pipe._decode_images(z), full._decode_images(z)
            finite = bool(torch.isfinite(fixed).all())
            diff = float((fixed - ref).abs().max()) if finite else float("nan")
            return (
                finite and diff < 1e-2,
                f"fp16 overflowed at latents x{scale:g}; fallback finite {finite}, max diff to fp32 {diff:.1e}",
            )
        return False, "no overflow reached up to latents x1e4: the fallback was not exercised"

    def compiled(self) -> tuple[bool, str]:
        """--compile, and --compile with CUDA graphs and channels_last, render the eager images."""
        if self.smoke:
            raise SkipCheck("minutes on a CPU; tests/test_fastpath.py compiles on the CPU")
        reqs = [request("a big red circle", seed=s, steps=6, width=32, height=32) for s in range(1, 5)]
        eager = pixels(self.demo(self.half).render(reqs))
        variants = {"compile": Tuning(compile=True)}
        if self.device.type == "cuda":
            variants["compile+graphs+NHWC"] = Tuning(compile=True, cuda_graphs=True, channels_last=True)
        ok, parts = True, []
        for name, tuning in variants.items():
            pipe = self.demo(self.half, tuning)
            start = time.perf_counter()
            pipe.render(reqs)  # compiles this shape
            warm = time.perf_counter() - start
            got = pixels(pipe.render(reqs))
            worst, mean = np.abs(got - eager).max(), np.abs(got - eager).mean()
            ok &= bool(mean < 1.0 and worst <= 16)
            parts.append(f"{name}: max {worst:.0f}, mean {mean:.3f} px vs eager, first batch {warm:.0f} s")
        return ok, "; ".join(parts)

    def oom_backoff(self) -> tuple[bool, str]:
        """A batch that cannot fit (the allocator capped to a fraction of the card) is rendered in
        halves by the OOM back-off: a real torch.OutOfMemoryError, every image made."""
        cuda_only(self.device)
        pipe = self.random_model(torch.float16)
        peak_reset(self.device)
        pipe.render([request("x", seed=0, steps=1, width=512, height=512)])
        one = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(0.9, 3 * one / total), self.device)
        try:
            render = with_backoff(pipe.render)
            results = render([request("x", seed=s, steps=2, width=512, height=512) for s in range(32)])
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        made = sum(getattr(r, "ok", False) for r in results)  # the back-off's (None, why) for what never fit
        limit = render.limit[0]
        return (
            made == 32 and limit is not None,
            f"32 asked under a {3 * one / 2**30:.1f} GiB cap: {made} made, batch cut to {limit}",
        )

    def memory_1024(self) -> tuple[bool, str]:
        """Peak memory at 1024x1024 (one image): plain, VAE tiled, low-VRAM."""
        cuda_only(self.device)
        parts = []
        for name, tuning in {
            "plain": Tuning(),
            "vae_tile 64": Tuning(vae_tile=64),
            "low_vram": Tuning(low_vram=True),
        }.items():
            pipe = self.random_model(torch.float16, tuning)
            peak_reset(self.device)
            result = pipe.render([request("x", seed=1, steps=2, width=1024, height=1024)])[0]
            parts.append(f"{name} {peak_gib(self.device):.1f} GiB{'' if result.ok else ' (' + str(result.error) + ')'}")
            del pipe
        return True, "; ".join(parts)

    def worker(self) -> tuple[bool, str]:
        """`sdbatch run` end to end on the device through its worker (--devices cuda:0)."""
        devices = "cuda:0" if self.device.type == "cuda" else "cpu"
        with tempfile.TemporaryDirectory() as tmp:
            job = Path(tmp) / "job.yaml"
            job.write_text("model: demo\nsteps: 6\nprompt: a big red circle\nseed: 1-8\ncfg: [4, 7]\n")
            out = Path(tmp) / "out"
            cmd = [sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(out), "--devices", devices, "-q"]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240)
            (self.out / "worker.log").write_text(done.stdout + done.stderr)
            images = len([p for p in out.glob("*.png")])
        return done.returncode == 0 and images == 16, f"exit {done.returncode}, {images} of 16 images ({devices})"

    def pytest(self) -> tuple[bool, str]:
        """The pipeline/parity tests with their pipelines on this device (tests/helpers.TEST_DEVICE)."""
        cuda_only(self.device)
        env = dict(os.environ, SDBATCH_TEST_DEVICE=str(self.device))
        files = ["tests/test_pipeline.py", "tests/test_half_precision.py"]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        (self.out / "pytest.log").write_text(done.stdout + done.stderr)
        return done.returncode == 0, (done.stdout.strip().splitlines() or ["no output"])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the report (default: a temp folder)")
    parser.add_argument("--smoke", action="store_true", help="the CPU, tiny sizes: the script runs")
    parser.add_argument("--only", default="", help="comma-separated check names")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")  # indexed: the
    # memory-fraction call needs it
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    report = Report(out)
    checks = Checks(device, half, args.smoke, out)
    names = ["env", "randn", "renders", "vae_overflow", "compiled", "oom_backoff", "memory_1024", "worker", "pytest"]
    for name in args.only.split(",") if args.only else names:
        report.run(name, getattr(checks, name))
    print(f"report: {report.path}")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
