"""Fuzzing job files through the loader and the plan (no rendering): random documents built from
the real schema's keys, hostile values (lone surrogates, control characters, infinities, numbers
of hundreds of digits, ranges that never end, format-spec templates, bombs and damaged files as
images and prompt files) and hostile bytes (raw control characters, invalid UTF-8, aliases, deep
nesting). Every example must end in a plan or an InputError whose message can be printed; any
other exception, or more than 2 GiB of address space, fails.

The examples run in a child process under RLIMIT_AS, so that a document that makes the loader
allocate without bound fails the test instead of the machine.
"""

import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdbatch.jobs.fields import PARAMS
from sdbatch.jobs.job import BLOCK_KEYS, TOP_KEYS
from sdbatch.output.names import MAX_NAME_BYTES, TOKENS

MEMORY_LIMIT = 2 * 2**30
EXAMPLES = 250

# -- values


def _hostile_char() -> st.SearchStrategy[str]:
    """Any code point, surrogates and control characters included (hypothesis leaves out Cs)."""
    return st.one_of(
        st.characters(exclude_categories=()),
        st.sampled_from(["\x00", "\x1b", "\r", "\n", "\t", "\x85", "\ud800", "\udfff", "\u202e", "/", "\\"]),
    )


TEXT = st.one_of(
    st.text(_hostile_char(), max_size=12),
    st.sampled_from(["a red circle", "a blue square", "", " ", "random", "random [2]", "auto", "yes"]),
)
NUMBER_TEXT = st.sampled_from(["0", "1", "-1", "7.5", "0.5", "1e999", "-1e999", "1e-320", "1e308", "9" * 60, ".5"])
NUMBER = st.one_of(
    st.integers(-5, 40),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, -(10**30), 2**64, 2**64 - 1]),
)
RANGE_TEXT = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", NUMBER_TEXT, NUMBER_TEXT),
    st.builds(lambda a, b, s: f"{a}-{b} (+{s})", NUMBER_TEXT, NUMBER_TEXT, NUMBER_TEXT),
    st.builds(lambda a, b, n: f"{a}-{b} [{n}]", NUMBER_TEXT, NUMBER_TEXT, st.sampled_from(["0", "3", "50", "9" * 40])),
    st.builds(lambda a, b: f"{a}, {b}", NUMBER_TEXT, NUMBER_TEXT),
    st.text(alphabet="0123456789.-+()[], e", max_size=16),
)
SPEC = st.text(alphabet="<>^=+-# 0123456789,._dfxXeEgGsbocn%{}!ra", max_size=7)
TEMPLATE = st.lists(
    st.one_of(
        st.sampled_from(TOKENS).map(lambda t: "{" + t + "}"),
        st.builds(lambda t, spec: "{" + t + ":" + spec + "}", st.sampled_from(TOKENS), SPEC),
        st.builds(lambda t, a: "{" + t + a + "}", st.sampled_from(TOKENS), st.sampled_from([".real", "[0]", "!r"])),
        st.text(alphabet="abc-_.{}/\\\x00 ", max_size=4),
        TEXT,
    ),
    max_size=4,
).map("".join)
FILES = ["good.png", "truncated.png", "bomb.png", "notes.txt", "folder", "missing.png", "/dev/zero", "good.jpg"]
PATH = st.one_of(st.sampled_from(FILES), TEXT)
PROMPT_FILE = st.builds(
    lambda f: {"file": f}, st.sampled_from(["prompts.txt", "binary.txt", "empty.txt", "ctrl.txt", "/dev/zero"])
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT, RANGE_TEXT, PATH, TEMPLATE, PROMPT_FILE)
VALUES = {
    "prompt": st.one_of(TEXT, PROMPT_FILE, st.lists(TEXT, max_size=3)),
    "negative": st.one_of(TEXT, PROMPT_FILE),
    "init_image": st.one_of(PATH, st.none(), st.lists(st.one_of(PATH, st.none()), max_size=2)),
    "mask": st.one_of(PATH, st.none()),
    "size": st.one_of(NUMBER, st.sampled_from([32, 24, "32x32", [32, 64], [8, 8], "99999x8"]), TEXT),
    "sampler": st.one_of(st.sampled_from(["euler", "ddim", "Euler a", "dpm++ 2m karras", "eulr"]), TEXT),
    "karras": st.one_of(st.booleans(), TEXT),
    "steps": st.one_of(NUMBER, RANGE_TEXT, st.lists(NUMBER, max_size=3)),
    "strength": st.one_of(NUMBER, RANGE_TEXT),
    "cfg": st.one_of(NUMBER, RANGE_TEXT, st.lists(NUMBER, max_size=3)),
    "seed": st.one_of(NUMBER, RANGE_TEXT, st.sampled_from(["random", "random [3]", "random [99999999]", -1])),
    "batch_size": st.one_of(NUMBER, st.just("auto"), TEXT),
    "filename": TEMPLATE,
    "name": TEXT,
    "model": st.one_of(st.just("demo"), TEXT),
    "vae": st.one_of(PATH, st.none()),
    "output": st.one_of(TEXT, st.just("out")),
    "devices": st.one_of(st.sampled_from(["auto", "cpu", "cpu*2", "cpu*99999999999", "cuda:x", "cpu*²"]), TEXT),
    "sheet": st.one_of(
        st.dictionaries(st.sampled_from(["x", "y", "z"]), st.one_of(st.sampled_from(PARAMS), TEXT, st.none())), TEXT
    ),
}
ANY = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=6,
)
KEY = st.one_of(st.sampled_from([*TOP_KEYS, *PARAMS, *BLOCK_KEYS, "cfg_scale", "width", "bogus"]), TEXT)


def _value(key: str) -> st.SearchStrategy:
    return st.one_of(VALUES.get(key, ANY), ANY) if key in VALUES else ANY


PARAMETERS = st.sampled_from(PARAMS).flatmap(lambda k: st.tuples(st.just(k), _value(k)))


SANE = {
    "prompt": st.sampled_from(["a red circle", "a blue square on the left", {"file": "prompts.txt"}]),
    "negative": st.sampled_from(["", "blurry"]),
    "seed": st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(["1-3", "random", "random [2]", "5, 7", -1])),
    "steps": st.one_of(st.integers(1, 4), st.just("1-3")),
    "cfg": st.one_of(st.floats(0, 100), st.sampled_from(["1-3", "2-4 [3]", 7])),
    "strength": st.sampled_from([0.5, 1, "0.5-1 [2]"]),
    "size": st.sampled_from([32, 24, [32, 32], "32x32"]),
    "sampler": st.sampled_from(["euler", "ddim", "Euler a", "dpmpp_2m", "ddpm"]),
    "karras": st.booleans(),
    "init_image": st.sampled_from(["good.png", "good.jpg", None]),
    "mask": st.sampled_from(["good.png", None]),
    "filename": st.sampled_from(["{seed}-{slug}", "{index:05d}", "{cfg:.1f}-{prompt}", "{strength}", "{id}{run}"]),
    "name": st.sampled_from(["fuzz", "a b"]),
    "devices": st.sampled_from(["cpu", "auto", "cpu*2"]),
    "sheet": st.sampled_from([{"x": "seed"}, {"x": "cfg", "y": "seed"}]),
    "batch_size": st.sampled_from(["auto", 2]),
    "hires": st.sampled_from(
        [
            {"scale": 2},
            {"scale": [None, 1.5], "denoise": "0.3-0.7 [3]", "steps": 2},
            {"resize": "48x0", "upscaler": "lanczos", "sampler": "ddim"},
            {"resize": [40, 24], "upscaler": "Latent (bicubic)", "prompt": "[a:b:0.5]", "cfg": 3},
            {"scale": 2, "upscaler": "no-such-model"},
            None,
            "none",
            {},
        ]
    ),
    "mask_missing": st.sampled_from(["skip", "full", "bogus"]),
}
SANE_KEYS = st.sampled_from(sorted(SANE))
RUN = st.lists(st.one_of(PARAMETERS, SANE_KEYS.flatmap(lambda k: st.tuples(st.just(k), SANE[k]))), max_size=4).map(dict)


@st.composite
def documents(draw) -> dict:
    """Mostly a valid job with a few sane parameters, and sometimes hostile keys and values."""
    doc: dict = {"prompt": draw(SANE["prompt"])}
    for key in draw(st.lists(SANE_KEYS, max_size=4, unique=True)):
        doc[key] = draw(SANE[key])
    if draw(st.integers(0, 2)) == 0:  # one hostile value in a known key
        key = draw(st.sampled_from(sorted(VALUES)))
        doc[key] = draw(VALUES[key])
    if draw(st.integers(0, 5)) == 0:  # anything at all
        doc |= dict(draw(st.lists(KEY.flatmap(lambda k: st.tuples(st.just(k), _value(k))), max_size=3)))
    if draw(st.integers(0, 4)) == 0:
        runs = [{**draw(RUN), "prompt": draw(SANE["prompt"])} for _ in range(draw(st.integers(1, 3)))]
        doc = {k: v for k, v in doc.items() if k not in PARAMS} | {"runs": runs}
        if draw(st.booleans()):
            doc["defaults"] = {k: draw(SANE[k]) for k in draw(st.lists(SANE_KEYS, max_size=3, unique=True))}
    return doc


@st.composite
def job_bytes(draw) -> bytes:
    """A YAML document from the schema, sometimes with hostile bytes or structure added."""
    text = yaml.safe_dump(draw(documents()), allow_unicode=False, sort_keys=False)
    data = text.encode()
    mutation = draw(st.sampled_from(["none"] * 6 + ["bytes", "laughs", "deep", "cut", "anchors"]))
    if mutation == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif mutation == "laughs":  # 9**levels values behind one alias
        levels = draw(st.integers(1, 9))
        lines = ["l0: &l0 [a, b, c, d, e, f, g, h, i]"]
        lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
        key = draw(st.sampled_from(["prompt", "seed", "bogus", "sheet", "runs", "defaults"]))
        data = ("\n".join(lines) + f"\n{key}: *l{levels - 1}\n").encode() + data
    elif mutation == "deep":
        depth = draw(st.integers(1, 3000))
        data = f"prompt: {'[' * depth}x{']' * depth}\n".encode() + data
    elif mutation == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "anchors":
        data = b"defaults: &d {steps: 2}\nruns:\n  - <<: *d\n    prompt: a\n  - {<<: [*d, *d], prompt: b}\n" + data
    return data


# -- fixtures the values point at


def _write_fixtures(folder: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(folder / "good.png")
    Image.new("RGB", (32, 32), "blue").save(folder / "good.jpg")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) - 30])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "folder").mkdir(exist_ok=True)
    (folder / "prompts.txt").write_text("a red circle\n# comment\n\na blue square\n")
    (folder / "binary.txt").write_bytes(bytes(range(256)))
    (folder / "empty.txt").write_text("\n# nothing\n")
    (folder / "ctrl.txt").write_bytes(b"fine\nnot \x1b[2J fine\n")


def fuzz_jobs(folder: Path, examples: int = EXAMPLES) -> None:
    """The fuzz itself (run in the child process): load and plan every document."""
    from sdbatch.errors import InputError
    from sdbatch.jobs import load_job
    from sdbatch.output.names import file_name
    from sdbatch.plan import ModelInfo, plan_job

    _write_fixtures(folder)
    model = ModelInfo.of("demo")
    _ = model.sha256, model.hash  # hashed once, outside the examples
    job_path = folder / "job.yaml"
    outcomes = {"plan": 0, "refused": 0}

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(job_bytes())
    def one(data: bytes) -> None:
        job_path.write_bytes(data)
        try:
            job = load_job(job_path)
            if job.size() > 5000:  # loaded and checked in full; planning ids for all is only slow
                outcomes["plan"] += 1
                return
            plan = plan_job(job, folder / "out", model=model)
        except InputError as e:
            message = str(e)
            assert message.strip(), "an InputError with no message"
            message.encode("utf-8")  # printable: no lone surrogates reach the terminal
            assert "Traceback" not in message
            outcomes["refused"] += 1
            if os.environ.get("FUZZ_VERBOSE"):
                print("refused:", message.splitlines()[0][-100:].encode("unicode_escape").decode())
            return
        outcomes["plan"] += 1
        assert plan.tasks
        for task in plan.tasks:
            r = task.recipe
            (r.prompt + r.negative).encode("utf-8")  # writable into PNG chunks and the manifest
            assert 1 <= r.steps <= 1000 and 0 <= r.seed < 2**64 and r.width % 8 == 0
            name = file_name(job.filename, task)
            assert name.endswith(".png") and "/" not in name and "\0" not in name
            assert len(name.encode()) <= MAX_NAME_BYTES
        for name in plan.names.values():  # with a task id appended where names collide
            assert len(name.encode()) <= 255 and "/" not in name

    one()
    print(f"fuzz: {outcomes['plan']} planned, {outcomes['refused']} refused")


def test_random_job_documents_give_a_plan_or_one_input_error(tmp_path):
    """The fuzz, in a child process limited to MEMORY_LIMIT bytes of address space (which also
    proves the loader and the plan never import torch: torch alone reserves more than that)."""
    code = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        import test_fuzz
        test_fuzz.fuzz_jobs(Path({str(tmp_path)!r}))
        assert "torch" not in sys.modules, "the loader or the plan imported torch"
        """
    )
    env = dict(os.environ, PYTHONHASHSEED="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "fuzz:" in result.stdout
