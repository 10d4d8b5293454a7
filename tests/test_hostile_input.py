"""Hostile and damaged input, class by class: every case gives exit 2 and one line on stderr that
starts with `error:` and says what is wrong and where; never a traceback, never an image rendered.

Each case builds its input under tmp_path and returns the command line. The classes: bytes a YAML
file must not hold, documents too deep or too large once their aliases are expanded, ranges that
reach infinity, file-name templates, text that is not text (lone surrogates, control characters),
images that are bombs or damaged, model configs and files that are not what they claim, damaged
metadata and records in output folders, and `--devices` values.
"""

import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from sdbatch.output.png import png_bytes

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "weights" / "demo" / "model.safetensors"
Case = Callable[[Path], list[str]]


def sdbatch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdbatch", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2, exactly one non-empty stderr line, starting with `error:`, no traceback."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, output[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def job_file(tmp: Path, text: str | bytes, name: str = "job.yaml") -> Path:
    path = tmp / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def validate(text: str | bytes) -> Case:
    return lambda tmp: ["validate", str(job_file(tmp, text))]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height 1-bit pixels in a few hundred bytes: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * (width // 8 + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def good_png(path: Path, text: dict[str, str] | None = None, size: int = 32) -> Path:
    path.write_bytes(png_bytes(Image.new("RGB", (size, size), "red"), text))
    return path


BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=False)),
        "prompt: *i",
        "",
    ]
)


# ----------------------------------------------------------------------------------------------------
# the job file: bytes, structure, ranges, templates, text


JOB_CASES: dict[str, tuple[Case, tuple[str, ...]]] = {
    # before the fix: yaml.ReaderError escaped (the loader was built outside the error handling)
    "control-character": (validate(b'prompt: "a\x01b"\n'), ("job.yaml:1", "control character U+0001")),
    "nul-byte": (validate(b"prompt: a\x00b\n"), ("job.yaml:1", "NUL")),
    "invalid-utf8": (validate(b"prompt: ok\nnegative: \xff\xfe\n"), ("job.yaml:2", "not UTF-8")),
    # before: RecursionError in the composer
    "deep-nesting": (validate("prompt: " + "[" * 10000 + "]" * 10000 + "\n"), ("nested more than",)),
    "deep-mappings": (validate("prompt: " + "{a: " * 3000 + "b" + "}" * 3000 + "\n"), ("nested more than",)),
    # before: expanded by the loader (9**9 values) and walked by the checker
    "billion-laughs": (validate(BILLION_LAUGHS), ("aliases", "expand to more than")),
    "recursive-alias": (validate("prompt: &a [p, *a]\n"), ("refers to itself",)),
    "bad-date": (validate("prompt: p\nseed: 2024-13-45\n"), ("job.yaml:2", "cannot read the value")),
    "huge-integer": (validate("prompt: p\nseed: " + "9" * 5000 + "\n"), ("job.yaml:2",)),
    # before: OverflowError (cannot convert float infinity to integer)
    "range-to-infinity": (validate("prompt: p\ncfg: 1-1e999\n"), ("job.yaml:2: cfg:", "not a finite number")),
    "range-tiny-step": (validate("prompt: p\ncfg: 0-1 (+1e-320)\n"), ("job.yaml:2: cfg:", "more than 100,000")),
    "range-huge-span": (validate("prompt: p\ncfg: 1-1e308 (+1e-308)\n"), ("job.yaml:2: cfg:", "more than 100,000")),
    "range-huge-count": (validate("prompt: p\ncfg: 0-1 [" + "9" * 30 + "]\n"), ("job.yaml:2: cfg:",)),
    "integer-overflow-cfg": (validate("prompt: p\ncfg: " + "9" * 400 + "\n"), ("job.yaml:2: cfg:",)),
    # before: accepted by validate, then rendered or crashed at plan/run time
    "template-attribute": (validate("prompt: p\nfilename: '{prompt.__class__}'\n"), ("job.yaml:2: filename:",)),
    "template-index": (validate("prompt: p\nfilename: '{prompt[0]}'\n"), ("job.yaml:2: filename:",)),
    "template-huge-width": (validate("prompt: p\nfilename: '{seed:99999999}'\n"), ("job.yaml:2: filename:",)),
    "template-nested-width": (validate("prompt: p\nfilename: '{seed:{seed}}'\n"), ("job.yaml:2: filename:",)),
    "template-type-at-plan-time": (validate("prompt: p\nfilename: '{cfg:d}'\n"), ("job.yaml:2: filename:", "'d'")),
    "template-char-of-seed": (validate("prompt: p\nseed: 9999999\nfilename: '{seed:c}'\n"), ("filename:",)),
    "template-strength-txt2img": (
        validate("prompt: p\nfilename: '{strength:.2f}'\n"),
        ("filename:", "strength ''"),
    ),
    "template-positional": (validate("prompt: p\nfilename: '{}-{0}'\n"), ("filename:", "unknown field")),
    # lone surrogates (YAML "\ud800" escapes) and escaped control characters, wherever they are
    "surrogate-prompt": (validate('prompt: "a \\ud800"\n'), ("job.yaml:1: prompt:", "surrogate")),
    "surrogate-negative": (validate('prompt: p\nnegative: "\\udfff"\n'), ("job.yaml:2: negative:", "surrogate")),
    "surrogate-name": (validate('name: "\\ud800"\nprompt: p\n'), ("job.yaml:1: name:", "surrogate")),
    "surrogate-output": (validate('prompt: p\noutput: "out\\ud800"\n'), ("job.yaml:2: output:", "surrogate")),
    "surrogate-filename": (validate('prompt: p\nfilename: "{seed}\\ud800"\n'), ("job.yaml:2: filename:",)),
    "surrogate-init-image": (validate('prompt: p\ninit_image: "\\ud800.png"\n'), ("job.yaml:2: init_image:",)),
    "surrogate-key": (validate('prompt: p\n"\\ud800": 1\n'), ("job.yaml:2", "surrogate")),
    "surrogate-in-run-2": (
        validate('runs:\n  - prompt: fine\n  - prompt: "bad \\ud800"\n'),
        ("job.yaml:3: runs[1].prompt:", "surrogate"),
    ),
    "escaped-nul-in-prompt": (validate('prompt: "a\\0b"\n'), ("job.yaml:1: prompt:", "NUL")),
    "escape-sequence-in-prompt": (validate('prompt: "\\e[31mred"\n'), ("job.yaml:1: prompt:", "U+001B")),
    "newline-in-name": (validate('name: "a\\nb"\nprompt: p\n'), ("job.yaml:1: name:", "line break")),
    "carriage-return-in-prompt": (validate('prompt: "a\\rb"\n'), ("job.yaml:1: prompt:", "carriage return")),
    "huge-value-echoed-in-part": (
        validate("prompt: p\nsampler: " + "a" * 5000 + "\n"),
        ("job.yaml:2: sampler:", "more characters"),
    ),
    "long-name": (validate("name: " + "n" * 300 + "\nprompt: p\n"), ("job.yaml:1: name:", "longer than")),
    "devices-in-job": (validate("prompt: p\ndevices: cpu*99999999999\n"), ("job.yaml:2: devices:", "64")),
    "devices-unicode-digit": (validate("prompt: p\ndevices: 'cpu*²'\n"), ("job.yaml:2: devices:",)),
    "job-file-is-binary": (validate(bytes(range(256)) * 4), ("job.yaml",)),
    "sheet-axis-is-a-list": (validate("prompt: p\nsheet: {x: [seed, cfg]}\n"), ("job.yaml:2: sheet.x:",)),
    "model-path-too-long": (validate("prompt: p\nmodel: " + "m" * 5000 + "\n"), ("job.yaml:2: model:", "longer")),
    "model-name-too-long": (validate("prompt: p\nmodel: " + "m" * 300 + "\n"), ("not found",)),
    "vae-name-too-long": (validate("prompt: p\nvae: " + "v" * 300 + "\n"), ("job.yaml:2: vae:", "does not exist")),
    # before: the model's own message without the job file's line
    "model-not-found": (validate("prompt: p\nmodel: nope\n"), ("job.yaml:2: model:", "not found")),
    # before: accepted by validate, refused by run
    "output-is-a-file": (validate("prompt: p\noutput: job.yaml\n"), ("job.yaml:2: output:", "is a file")),
}


@pytest.mark.parametrize("name", list(JOB_CASES))
def test_hostile_job_files(tmp_path, name):
    make, expected = JOB_CASES[name]
    assert_one_error_line(sdbatch(*make(tmp_path)), *expected)


def test_a_bad_second_run_renders_nothing_of_the_first(tmp_path):
    """All checks happen before rendering: run 1 is fine, run 2's prompt cannot be written."""
    job = job_file(tmp_path, 'output: out\nruns:\n  - prompt: a red circle\n    steps: 1\n  - prompt: "\\ud800"\n')
    assert_one_error_line(sdbatch("run", str(job)), "runs[1].prompt")
    assert not list(tmp_path.rglob("*.png"))


def test_a_prompt_file_with_control_characters_and_one_that_is_not_a_file(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"a red circle\nsecond \x1b[2J line\n")
    job = job_file(tmp_path, "prompt: {file: prompts.txt}\n")
    assert_one_error_line(sdbatch("validate", str(job)), "job.yaml:1: prompt:", "prompts.txt:2", "U+001B")
    job = job_file(tmp_path, "prompt: {file: /dev/zero}\n")
    assert_one_error_line(sdbatch("validate", str(job)), "job.yaml:1: prompt:", "not a regular file")


def capped(*args: str) -> subprocess.CompletedProcess:
    """sdbatch under a 4 GiB address-space cap: a read that follows a file to its end fails fast
    (MemoryError, a traceback) instead of filling the machine."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    return subprocess.run(
        [sys.executable, "-m", "sdbatch", *args], capture_output=True, text=True, timeout=120, preexec_fn=cap
    )


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom"])
def test_endless_files_are_read_only_up_to_a_limit(tmp_path, path):
    """`import /dev/zero` once read until the machine ran out of memory (stat says 0 bytes): every
    text a user names (job, import source, prompt and wildcard files) is read to a limit instead."""
    assert_one_error_line(capped("import", path), path, "larger than")
    assert_one_error_line(capped("validate", path), path, "larger than")


@pytest.mark.parametrize("command", ["validate", "import"])
def test_a_fifo_nobody_writes_to_is_read_as_empty_not_waited_on(tmp_path, command):
    """`validate FIFO` and `import FIFO` waited forever in open() for a writer."""
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    assert_one_error_line(capped(command, str(fifo)), str(fifo))


def test_a_huge_wildcard_file_is_refused_not_read(tmp_path):
    wildcards = tmp_path / "wildcards"
    wildcards.mkdir()
    with open(wildcards / "huge.txt", "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MB of NULs that take no disk
    job = job_file(tmp_path, "prompt: a __huge__ cat\nwildcards: wildcards\n")
    assert_one_error_line(capped("validate", str(job)), "job.yaml:1: prompt:", "huge.txt", "larger than 16 MB")


# ----------------------------------------------------------------------------------------------------
# images: bombs, damage, in jobs and in inspect


def image_job(kind: str, key: str = "init_image") -> Case:
    def make(tmp: Path) -> list[str]:
        if kind == "bomb":
            png_header_only(tmp / "img.png", 30000, 30000)  # 900 Mpx: Pillow's own error (was a traceback)
        elif kind == "big":
            png_header_only(tmp / "img.png", 12000, 12000)  # 144 Mpx: only Pillow's warning (was accepted)
        elif kind == "truncated":
            data = good_png(tmp / "whole.png").read_bytes()
            (tmp / "img.png").write_bytes(data[: len(data) - 30])
        elif kind == "garbage":
            (tmp / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        init = "init_image: ok.png\nmask: img.png\n" if key == "mask" else "init_image: img.png\n"
        good_png(tmp / "ok.png")
        return ["validate", str(job_file(tmp, f"prompt: p\n{init}size: 32\n"))]

    return make


IMAGE_CASES = {
    "bomb": (image_job("bomb"), ("job.yaml:2: init_image:", "decompression bomb")),
    "big-image": (image_job("big"), ("job.yaml:2: init_image:", "144,000,000 pixels")),
    "bomb-as-mask": (image_job("bomb", "mask"), ("job.yaml:3: mask:", "decompression bomb")),
    "truncated": (image_job("truncated"), ("job.yaml:2: init_image:", "not an image Pillow can read")),
    "garbage": (image_job("garbage"), ("job.yaml:2: init_image:", "not an image Pillow can read")),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_hostile_images_in_jobs(tmp_path, name):
    make, expected = IMAGE_CASES[name]
    assert_one_error_line(sdbatch(*make(tmp_path)), *expected)


def inspect_png(text: dict[str, str] | None = None, raw: bytes | None = None, bomb: bool = False) -> Case:
    def make(tmp: Path) -> list[str]:
        path = tmp / "image.png"
        if bomb:
            png_header_only(path, 30000, 30000)
        elif raw is not None:
            path.write_bytes(raw)
        else:
            good_png(path, text)
        return ["inspect", str(path)]

    return make


def full_task(task: object) -> object:
    """A task record as sdbatch writes it (every field), with `task`'s values in it."""
    from sdbatch.recipe import Recipe

    return Recipe(prompt="a", size=(32, 32), steps=2).to_record() | task if isinstance(task, dict) else task


def sdbatch_chunk(task: object, **meta: object) -> dict[str, str]:
    return {"sdbatch": json.dumps({"task": full_task(task), "model": {"path": str(DEMO)}, **meta})}


INSPECT_CASES = {
    "bomb": (inspect_png(bomb=True), ("decompression bomb",)),
    "garbage": (inspect_png(raw=b"\x89PNG\r\n\x1a\n" + b"x" * 100), ("not an image Pillow can read",)),
    "not-json": (inspect_png({"sdbatch": "{not json"}), ("damaged", "not JSON")),
    "json-list": (inspect_png({"sdbatch": "[1, 2]"}), ("damaged", "list")),
    "json-number": (inspect_png({"sdbatch": "5"}), ("damaged", "int")),
    "task-is-a-list": (inspect_png(sdbatch_chunk([["prompt", "x"]])), ("damaged",)),
    "wrong-types": (inspect_png(sdbatch_chunk({"prompt": "a", "seed": "x", "size": "big"})), ("damaged", "size")),
    "cfg-too-large": (inspect_png({"sdbatch": '{"task": {"prompt": "a", "cfg": 1' + "0" * 400 + "}}"}), ("damaged",)),
    "deep-json": (inspect_png({"sdbatch": "[" * 100000 + "]" * 100000}), ("damaged",)),
}


@pytest.mark.parametrize("name", list(INSPECT_CASES))
def test_inspect_on_damaged_images(tmp_path, name):
    make, expected = INSPECT_CASES[name]
    assert_one_error_line(sdbatch(*make(tmp_path)), *expected)


def test_inspect_prints_hostile_text_escaped(tmp_path):
    """A surrogate or a terminal escape in metadata is shown escaped, never written raw (a lone
    surrogate used to crash the output's encoder, an ESC would drive the terminal)."""
    path = good_png(tmp_path / "a.png", sdbatch_chunk({"prompt": "a b"}, job="\ud800\x1b[2J"))
    result = sdbatch("inspect", str(path))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b[2J" in result.stdout and "\\ud800" in result.stdout
    # in the recipe itself such text could never have been rendered: the chunk is damaged (exit 2)
    path = good_png(tmp_path / "b.png", sdbatch_chunk({"prompt": "a\x1b[2J b"}))
    result = sdbatch("inspect", str(path))
    assert result.returncode == 2 and "U+001B" in result.stderr and "\x1b" not in result.stderr


RERUN_CASES = {
    "surrogate-prompt": (sdbatch_chunk({"prompt": "\ud800"}), ("damaged", "surrogate")),
    "surrogate-job-name": (sdbatch_chunk({"prompt": "a"}, job="\udc80"), ("damaged", "surrogate")),
    "index-not-a-number": (sdbatch_chunk({"prompt": "a", "index": "zz"}), ("damaged", "index")),
    "index-infinite": ({"sdbatch": '{"task": {"prompt": "a", "index": 1e400}}'}, ("damaged", "index")),
    "model-path-not-text": ({"sdbatch": json.dumps({"task": full_task({}), "model": {"path": 5}})}, ("model",)),
    "task-empty": ({"sdbatch": json.dumps({"task": {}, "model": {"path": str(DEMO)}})}, ("lacks",)),
    "task-without-seed": (
        {"sdbatch": json.dumps({"task": {k: v for k, v in full_task({}).items() if k != "seed"}})},
        ("lacks seed",),
    ),
    "model-is-a-list": ({"sdbatch": json.dumps({"task": {"prompt": "a"}, "model": [1]})}, ("damaged",)),
    "a1111-nul": (
        {"parameters": "a\x00b\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 32x32"},
        ("prompt", "NUL"),
    ),
}


@pytest.mark.parametrize("name", list(RERUN_CASES))
def test_rerun_on_damaged_metadata_renders_nothing(tmp_path, name):
    text, expected = RERUN_CASES[name]
    path = good_png(tmp_path / "image.png", text)
    assert_one_error_line(sdbatch("rerun", str(path), "-o", str(tmp_path / "out")), *expected)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_rerun_refuses_an_init_image_that_became_a_bomb(tmp_path):
    bomb = png_header_only(tmp_path / "init.png", 30000, 30000)
    record = {"prompt": "a", "init_image": str(bomb), "strength": 0.5, "size": [32, 32], "steps": 2}
    path = good_png(tmp_path / "image.png", sdbatch_chunk(record))
    assert_one_error_line(sdbatch("rerun", str(path), "-o", str(tmp_path / "out")), "init_image", "bomb")


# ----------------------------------------------------------------------------------------------------
# models: configs, files, VAEs


def demo_with_config(change: Callable[[dict], object]) -> Callable[[Path], Path]:
    """The demo weights with their `sdbatch.config` header changed in place (or replaced by what
    `change` returns)."""

    def make(tmp: Path) -> Path:
        data = DEMO.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        config = json.loads(header["__metadata__"]["sdbatch.config"])
        replaced = change(config)
        header["__metadata__"]["sdbatch.config"] = json.dumps(config if replaced is None else replaced)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path = tmp / "model.safetensors"
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
        return path

    return make


def set_in(path: str, value: object) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        *parts, last = path.split(".")
        target = config
        for part in parts:
            target = target[part]
        target[last] = value

    return change


def diffusers_folder(tmp: Path, **configs: object) -> Path:
    """A diffusers folder (configs only; weights are never reached) with the demo's shape."""
    folder = tmp / "sd"
    unet = {
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [48, 96, 96],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "attention_head_dim": 4,
        "cross_attention_dim": 128,
        "norm_num_groups": 16,
    }
    vae = {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "latent_channels": 4, "in_channels": 3}
    vae["norm_num_groups"] = 8
    text = {"vocab_size": 640, "hidden_size": 128, "max_position_embeddings": 16, "num_hidden_layers": 3}
    text |= {"num_attention_heads": 4, "intermediate_size": 512}
    parts = {"unet": unet, "vae": vae, "text_encoder": text, "model_index": {"_class_name": "StableDiffusionPipeline"}}
    for name, config in parts.items():
        value = configs.get(name, config)
        path = folder / "model_index.json" if name == "model_index" else folder / name / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value(config) if callable(value) else value))
    return folder


def model_job(make_model: Callable[[Path], Path], vae: Callable[[Path], str] | None = None) -> Case:
    def make(tmp: Path) -> list[str]:
        model = make_model(tmp)
        lines = f"prompt: p\nmodel: {model}\n" + (f"vae: {vae(tmp)}\n" if vae else "")
        return ["validate", str(job_file(tmp, lines))]

    return make


def file_of(content: bytes, name: str = "model.safetensors") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name

    return make


def truncated_demo(tmp: Path) -> Path:
    data = DEMO.read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp / "cut.safetensors"


def ckpt_with_code(tmp: Path) -> Path:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, tmp / "evil.ckpt")
    return tmp / "evil.ckpt"


def tiny_checkpoint(tmp: Path) -> str:
    """A whole SD1-layout checkpoint of the `tiny` config: its VAE has other widths than the demo's."""
    from sdbatch.checkpoints import save_checkpoint
    from sdbatch.models import build_model

    return str(save_checkpoint(build_model("tiny"), tmp / "tiny.safetensors"))


def modified(change: Callable[[dict], None]) -> Callable[[dict], dict]:
    def apply(config: dict) -> dict:
        change(config)
        return config

    return apply


MODEL_CASES = {
    # before: accepted by validate (the config was never checked), then a crash deep in torch
    "norm-groups-zero": (model_job(demo_with_config(set_in("unet.norm_groups", 0))), ("norm_groups",)),
    "channels-as-text": (model_job(demo_with_config(set_in("unet.in_channels", "4"))), ("in_channels",)),
    "groups-do-not-divide": (model_job(demo_with_config(set_in("vae.norm_groups", 7))), ("norm groups",)),
    "config-is-a-list": (model_job(demo_with_config(lambda c: [])), ("sdbatch.config", "list")),
    "config-without-name": (model_job(demo_with_config(lambda c: c.pop("name") and None)), ("sdbatch.config", "name")),
    "config-does-not-fit-weights": (
        model_job(demo_with_config(set_in("unet.model_channels", 64))),
        ("does not fit model config", "input_blocks.0.0.weight"),
    ),
    "diffusers-unet-config-is-a-list": (
        model_job(lambda tmp: diffusers_folder(tmp, unet=[])),
        ("unet/config.json", "not a config"),
    ),
    "diffusers-model-index-is-a-list": (
        model_job(lambda tmp: diffusers_folder(tmp, model_index=[])),
        ("model_index.json", "not a config"),
    ),
    "diffusers-zero-channels": (
        model_job(lambda tmp: diffusers_folder(tmp, unet=modified(set_in("block_out_channels", [0, 0, 0])))),
        ("block_out_channels",),
    ),
    "diffusers-zero-layers": (
        model_job(lambda tmp: diffusers_folder(tmp, vae=modified(set_in("layers_per_block", 0)))),
        ("num_res_blocks",),
    ),
    "diffusers-without-weights": (model_job(lambda tmp: diffusers_folder(tmp)), ("no weights file",)),
    "empty-file": (model_job(file_of(b"")), ("empty",)),
    "truncated-file": (model_job(truncated_demo), ("truncated",)),
    "random-bytes": (model_job(file_of(bytes(range(1, 200)) * 3)), ("not a weights file",)),
    "html-page": (model_job(file_of(b"<!DOCTYPE html><html>log in</html>")), ("HTML page",)),
    "git-lfs-pointer": (model_job(file_of(b"version https://git-lfs.github.com/spec/v1\noid x\n")), ("Git LFS",)),
    "pickle-with-code": (model_job(ckpt_with_code), ("refused to load", "posix.system")),
    "zip-that-is-not-a-checkpoint": (model_job(file_of(b"PK\x03\x04" + b"\x00" * 100, "m.ckpt")), ("m.ckpt",)),
    # before: `validate` said ok; the run failed when it loaded the VAE
    "missing-vae": (model_job(lambda tmp: DEMO, vae=lambda tmp: "nope.safetensors"), ("job.yaml:3: vae:",)),
    "vae-that-is-html": (
        model_job(lambda tmp: DEMO, vae=lambda tmp: str(file_of(b"<html></html>", "vae.safetensors")(tmp))),
        ("vae.safetensors", "HTML"),
    ),
    "vae-that-does-not-fit": (model_job(lambda tmp: DEMO, vae=tiny_checkpoint), ("does not fit", "VAE")),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_validate_reads_model_and_vae_headers(tmp_path, name):
    make, expected = MODEL_CASES[name]
    assert_one_error_line(sdbatch(*make(tmp_path)), *expected)
    assert not (tmp_path / "pwned").exists()


def test_a_ckpt_is_judged_without_torch(tmp_path):
    """The pickle of a .ckpt is read by a restricted unpickler: names and shapes, no torch, no code
    run. A .ckpt carries no config, so the demo's weights do not fit sd15, and validate says so."""
    import torch

    from sdbatch.checkpoints import load_model, read_weights

    state = load_model(DEMO).model.state_dict()
    torch.save({"state_dict": state}, tmp_path / "demo.ckpt")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from sdbatch.checkpoints import CheckpointError, check_model_files\n"
        "try:\n"
        f"    check_model_files(Path({str(tmp_path / 'demo.ckpt')!r}))\n"
        "except CheckpointError as e:\n"
        "    assert \"does not fit model config 'sd15'\" in str(e), e\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    weights = read_weights(tmp_path / "demo.ckpt")
    assert weights.shapes() == {k: tuple(v.shape) for k, v in state.items()}
    key = next(iter(state))
    assert torch.equal(weights.tensors[key].load(), state[key])


def test_check_model_refuses_a_bad_config_in_one_line(tmp_path):
    path = demo_with_config(set_in("clip.heads", 0))(tmp_path)
    assert_one_error_line(sdbatch("check-model", str(path), "--no-hash"), "clip.heads")


# ----------------------------------------------------------------------------------------------------
# output folders: records, and --devices


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """A finished output folder of the demo model (4 images, 2 steps), copied by each test."""
    tmp = tmp_path_factory.mktemp("rendered")
    job = job_file(tmp, "prompt: [a red circle, a blue square]\nseed: random [2]\nsteps: 2\noutput: out\n")
    result = sdbatch("run", str(job), "-q")
    assert result.returncode == 0, result.stderr
    return tmp


def copy_of(rendered: Path, tmp: Path) -> Path:
    import shutil

    shutil.copytree(rendered, tmp / "job", dirs_exist_ok=True)
    return tmp / "job"


@pytest.mark.parametrize(("output", "expected"), [("", "empty path"), ("afile", "is not a folder")])
def test_rerun_refuses_a_bad_output_before_rendering(rendered, tmp_path, monkeypatch, output, expected):
    """-o '' wrote into the current folder; -o FILE rendered, then failed with a raw errno text."""
    image = next((rendered / "out").glob("*.png"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert_one_error_line(sdbatch("rerun", str(image), "-o", output), expected)
    assert not list(tmp_path.rglob("*.png"))


def test_rerun_finds_a_moved_model_by_its_recorded_name_and_sha256(rendered, tmp_path, monkeypatch):
    """Images recorded the model's path as found (weights/demo/... relative to where the run was),
    so rerun from any other folder failed; now the path is absolute, and a path that is gone is
    looked up by the recorded name, used only if its sha256 is the recorded one."""
    image = next((rendered / "out").glob("*.png"))
    with Image.open(image) as im:
        text = dict(im.text)
        meta = json.loads(text["sdbatch"])
        pixels = im.convert("RGB")
    assert Path(meta["model"]["path"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    for sha256, expected in ((meta["model"]["sha256"], 0), ("0" * 64, 2)):
        meta["model"] |= {"path": "old/place/model.safetensors", "sha256": sha256}
        moved = tmp_path / f"moved-{expected}.png"
        moved.write_bytes(png_bytes(pixels, {**text, "sdbatch": json.dumps(meta)}))
        result = sdbatch("rerun", str(moved), "-o", str(tmp_path / f"again-{expected}"))
        assert result.returncode == expected, result.stderr
    assert "another file" in result.stderr


@pytest.mark.parametrize(
    ("randoms", "expected"),
    [
        ({"run0.seed": "abc"}, ("randoms.json", "run0.seed", "not a list of seeds")),  # before: ValueError
        ({"run0.seed": 5}, ("randoms.json", "run0.seed")),  # before: TypeError
        ({"run0.seed": [True, -3]}, ("randoms.json", "run0.seed")),  # before: used as seeds 1 and -3
        ({"run0.seed": [2**70, 1]}, ("randoms.json", "run0.seed")),
    ],
)
def test_damaged_randoms_json_is_refused(rendered, tmp_path, randoms, expected):
    folder = copy_of(rendered, tmp_path)
    (folder / "out" / "randoms.json").write_text(json.dumps(randoms))
    assert_one_error_line(sdbatch("plan", str(folder / "job.yaml")), *expected)
    assert_one_error_line(sdbatch("run", str(folder / "job.yaml")), *expected)


@pytest.mark.parametrize(
    "damage",
    [
        {"job.json": b"\xff\xfe\x00 binary garbage"},
        {"job.json": b"[1, 2]"},
        {"job.json": json.dumps({"runs": 5, "name": 7}).encode()},
        {"job.json": json.dumps({"runs": [{"index": 0, "sheet": [1]}]}).encode()},
        {"manifest.jsonl": b"\xff\xfe\x00garbage\n"},
        {"manifest.jsonl": b'[1]\n5\n"x"\n'},
        {"manifest.jsonl": b'{"status": "ok", "file": 5, "run": "x", "index": "y", "id": []}\n'},
        {"manifest.jsonl": b'{"status": "ok", "file": "../../etc/passwd", "id": "a"}\n'},
    ],
    ids=lambda d: next(iter(d)) + ":" + next(iter(d.values()))[:12].decode("latin-1"),
)
def test_sheets_on_damaged_records(rendered, tmp_path, damage):
    """Damaged records are skipped or refused in one line; never a traceback."""
    folder = copy_of(rendered, tmp_path) / "out"
    for name, data in damage.items():
        (folder / name).write_bytes(data)
    result = sdbatch("sheets", str(folder))
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    if result.returncode != 0:
        assert_one_error_line(result)


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ("cpu*99999999999", "more than 64 workers"),  # before: MemoryError
        ("cpu*100000000000000000000000000000", "more than 64 workers"),  # before: OverflowError
        ("cpu*²", "write a device"),  # before: ValueError from int('²')
        ("cpu*0", "at least one worker"),
        ("cuda:x", "unknown device"),
    ],
)
def test_devices_are_capped_and_checked(tmp_path, devices, expected):
    job = job_file(tmp_path, "prompt: p\nsteps: 1\noutput: out\n")
    assert_one_error_line(sdbatch("run", str(job), "--devices", devices), "--devices", expected)
    assert not (tmp_path / "out").exists()  # refused before the output folder, its lock and job.json
    assert_one_error_line(sdbatch("run", str(job), "--devices", devices, "--dry-run"), "--devices", expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "JOB", "--batch-size", "0"], "--batch-size"),
        (["run", "JOB", "--vae-tile", "3"], "--vae-tile"),
        (["run", "JOB", "--no-such-option"], "--no-such-option"),
        (["plan", "JOB", "--show", "-5"], "--show"),
        (["run"], "Missing argument"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_command_line_mistakes_are_one_line_too(tmp_path, args, expected):
    """typer's framed usage box took several lines; scripts and logs get one, as for a bad job."""
    job = job_file(tmp_path, "prompt: p\nsteps: 1\noutput: out\n")
    assert_one_error_line(sdbatch(*[str(job) if a == "JOB" else a for a in args]), expected)
    assert not (tmp_path / "out").exists()


def test_parse_devices_in_process():
    from sdbatch.errors import InputError
    from sdbatch.render.devices import MAX_WORKERS, device_counts, parse_devices

    assert parse_devices("cpu*3") == ["cpu"] * 3
    assert device_counts("cuda, cpu*2") == [("cuda:0", 1), ("cpu", 2)]
    assert len(parse_devices(f"cpu*{MAX_WORKERS}")) == MAX_WORKERS
    for text in (f"cpu*{MAX_WORKERS + 1}", "cpu*1e3", "cpu * -1", "cuda:99999", "cpu;rm"):
        with pytest.raises(InputError):
            parse_devices(text)


# ----------------------------------------------------------------------------------------------------
# the rules themselves, in-process


def test_file_names_stay_within_their_byte_budget():
    from sdbatch.jobs import Task
    from sdbatch.output.names import MAX_NAME_BYTES, cut_utf8, file_name
    from sdbatch.recipe import Recipe

    task = Task(0, 0, "0123456789abcdef", Recipe(prompt="word " * 2000, seed=2**64 - 1))
    for template in ("{prompt}", "{prompt!r:>200}{seed:0>200}", "{id}" * 50, "{slug}-{size}-{cfg:.100f}"):
        name = file_name(template, task)
        assert name.endswith(".png") and len(name.encode()) <= MAX_NAME_BYTES, (template, len(name))
    assert cut_utf8("é" * 10, 5) == "éé"  # never half a character
    assert cut_utf8("abc", 10) == "abc"


def test_template_problems_are_found_statically_and_by_type():
    from sdbatch.output.names import template_problem

    sample = {"seed": 1, "cfg": 7.5, "steps": 2, "strength": "", "prompt": "a", "index": 0}
    assert template_problem("{index:05d}-{seed}-{cfg:.1f}", [sample]) is None
    for bad in ("{prompt.__class__}", "{prompt[0]}", "{seed:999}", "{seed:{seed}}", "{seed:c}", "{seed!x}", "{", "{}"):
        assert template_problem(bad, [sample]), bad
    assert "'d'" in template_problem("{cfg:d}", [sample])
    assert template_problem("{strength:.2f}", [sample])  # txt2img tasks have an empty strength


def test_text_rules():
    from sdbatch.text import printable, text_problem

    assert text_problem("a red circle") is None
    assert text_problem("line one\nline two\tx", multiline=True) is None
    assert "line break" in text_problem("a\nb")
    assert "surrogate" in text_problem("\ud800", multiline=True)
    assert "U+007F" in text_problem("\x7f", multiline=True)
    assert printable("a\x1b[1m\ud800\n") == "a\\x1b[1m\\ud800\n"


def test_every_shipped_config_is_valid_and_its_spot_shapes_are_real():
    from sdbatch.checkpoints import spot_shapes
    from sdbatch.models import CONFIGS, build_model
    from sdbatch.models.configs import config_problems

    for name, cfg in CONFIGS.items():
        assert config_problems(cfg) == [], name
        real = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
        assert {k: real.get(k) for k in spot_shapes(cfg)} == spot_shapes(cfg), name


def test_yaml_limits_hold_in_process(tmp_path):
    from sdbatch.jobs import JobError, parse_job
    from sdbatch.jobs.yamlmarks import MAX_DEPTH

    ok = "prompt: p\nseed: " + "[" * (MAX_DEPTH - 3) + "1" + "]" * (MAX_DEPTH - 3) + "\n"
    with pytest.raises(JobError, match="must be"):  # deep but within the limit: an ordinary error
        parse_job(ok, tmp_path / "j.yaml")
    with pytest.raises(JobError, match="nested more than"):
        parse_job("prompt: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), tmp_path / "j.yaml")
    shared = "a: &a [x, y]\nprompt: [*a, *a]\n"  # aliases in moderation are fine
    with pytest.raises(JobError, match="must be text"):
        parse_job(shared, tmp_path / "j.yaml")


def test_emoji_codes_in_user_text_stay_text(tmp_path):
    """Rich turns `:dog:` into an emoji unless told not to; a prompt-editing error quotes the prompt."""
    job = tmp_path / "job.yaml"
    job.write_text('prompt: "a [cat:dog:50] b"\nsteps: 20\n')
    result = sdbatch("validate", str(job))
    assert result.returncode == 2 and "[cat:dog:50]" in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------------
# found by fuzzing the CLI (session of 2026-12-06)


def test_a_job_file_whose_name_is_not_utf8_validates(tmp_path):
    """The job's default name is its file's stem: bytes that are not UTF-8 crashed the task ids."""
    name = os.fsdecode(b"caf\xe9.yaml")
    job_file(tmp_path, "prompt: a red circle\nsteps: 2\n", name=name)
    result = sdbatch("validate", name, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("name", ["../../../../../../dev/zero", "FIFO", "../../../../../../etc/hostname", "/dev/zero"])
def test_rerun_never_hashes_a_device_a_fifo_or_a_path_its_image_names(rendered, tmp_path, name):
    """A crafted image's recorded model name (tried when its path is gone) is a name in the weights
    folders, never a path: /dev/zero hashed for ever, a FIFO blocked in open()."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    image = next((rendered / "out").glob("*.png"))
    with Image.open(image) as im:
        text, pixels = dict(im.text), im.convert("RGB")
    meta = json.loads(text["sdbatch"])
    meta["model"] = {"path": "/nope/x.safetensors", "name": str(fifo) if name == "FIFO" else name, "sha256": "0"}
    crafted = tmp_path / "crafted.png"
    crafted.write_bytes(png_bytes(pixels, {**text, "sdbatch": json.dumps(meta)}))
    assert_one_error_line(sdbatch("rerun", str(crafted), "-o", str(tmp_path / "out")), "not found")


@pytest.mark.parametrize("device", ["/dev/zero", "FIFO"])
def test_a_model_that_is_a_device_or_a_fifo_is_named_as_such(tmp_path, device):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    target = str(path) if device == "FIFO" else device
    assert_one_error_line(sdbatch("check-model", target), "not a regular file")
    job = job_file(tmp_path, f"model: {target}\nprompt: a\nsteps: 2\n")
    assert_one_error_line(sdbatch("validate", str(job)), "not a regular file")


@pytest.mark.parametrize(
    ("name", "kind", "says"),
    [
        ("manifest.jsonl", "folder", "is a folder"),
        ("job.json", "folder", "is a folder"),
        ("randoms.json", "folder", "is a folder"),
        ("aside", "file", "not a folder"),
        ("sheets", "file", "not a folder"),
        ("manifest.jsonl", "fifo", "not a regular file"),
    ],
)
def test_what_sdbatch_keeps_in_its_folder_of_the_wrong_kind_is_refused_before_rendering(tmp_path, name, kind, says):
    """A folder where the manifest goes rendered every image, then failed them all (exit 1)."""
    out = tmp_path / "out"
    out.mkdir()
    {"folder": (out / name).mkdir, "file": (out / name).write_text, "fifo": lambda: os.mkfifo(out / name)}[kind](
        *(["x"] if kind == "file" else [])
    )
    job = job_file(tmp_path, "prompt: a red circle\nsteps: 2\nseed: 1-2\n")
    assert_one_error_line(sdbatch("run", str(job), "-o", str(out)), name, says)
    assert not list(out.glob("*.png"))


def test_plan_into_a_file_is_one_line(tmp_path):
    job = job_file(tmp_path, "prompt: a red circle\nsteps: 2\n")
    assert_one_error_line(sdbatch("plan", str(job), "-o", str(job)), "is a file, not a folder")


def test_a_wildcard_file_that_is_not_utf8_is_refused_at_its_line(tmp_path):
    """It reached the prompt as U+FFFD characters; job and prompt files were refused already."""
    (tmp_path / "wc").mkdir()
    (tmp_path / "wc" / "colors.txt").write_bytes(b"red\n\xff\xfe blue\n")
    job = job_file(tmp_path, "prompt: a __colors__ circle\nwildcards: wc\nsteps: 2\n")
    assert_one_error_line(sdbatch("validate", str(job)), "job.yaml:1: prompt", "colors.txt:2 is not UTF-8")


def test_rerun_looks_in_a_recorded_addon_folder_only_while_the_file_is_there(rendered, tmp_path):
    """A crafted image recording a LoRA at /zzz.safetensors made rerun list `/` (8 s, then 'more
    than 100000 files'): a recorded folder is searched only while the recorded file is in it."""
    image = next((rendered / "out").glob("*.png"))
    with Image.open(image) as im:
        text, pixels = dict(im.text), im.convert("RGB")
    meta = json.loads(text["sdbatch"])
    meta["task"]["prompt"] += " <lora:zzz:1>"
    meta["task"]["addons"] = {"loras": [{"name": "zzz", "path": "/zzz.safetensors", "sha256": "0" * 64}]}
    crafted = tmp_path / "crafted.png"
    crafted.write_bytes(png_bytes(pixels, {**text, "sdbatch": json.dumps(meta)}))
    line = assert_one_error_line(sdbatch("rerun", str(crafted), "-o", str(tmp_path / "out")), "zzz", "not found")
    assert "more than" not in line and "looked in /," not in line
