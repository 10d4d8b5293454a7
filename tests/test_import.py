"""`sdbatch import` on the corpus of real A1111 infotexts (tests/data/infotexts): every key is either
reproduced (the job's recipe holds its value, and our infotext gives it back) or reported (a comment
in the job, a warning); strict mode refuses naming the keys; an image made with the demo model, a
LoRA and an embedding imports into a job that renders.

The schedules are held to k-diffusion itself (test_kdiffusion.py's oracle) driven as A1111 drove it
before 1.9: `samplers_k_diffusion` gave a scheduler option to the ` Karras` (and since 1.6
` Exponential`) names only, e.g. `('DPM++ 2M', 'sample_dpmpp_2m', ['k_dpmpp_2m'], {})`, and
`KDiffusionSampler.get_sigmas` fell back to the model's own sigmas, `CompVisDenoiser.get_sigmas(n)`.
"""

import hashlib
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sdbatch.checkpoints import resolve_model
from sdbatch.errors import InputError
from sdbatch.importer import import_job
from sdbatch.jobs import load_job, parse_job
from sdbatch.output.a1111 import parse_infotext
from sdbatch.recipe import (
    A1111_ADDON_KEYS,
    A1111_IGNORED,
    A1111_IGNORED_VALUES,
    A1111_KEYS,
    Recipe,
    a1111_values,
)

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "weights" / "demo" / "model.safetensors"
DEMO_HASH = hashlib.sha256(DEMO.read_bytes()).hexdigest()[:10]  # A1111's Model hash since 1.0
CORPUS = sorted((REPO / "tests" / "data" / "infotexts").glob("*.txt"))
NO_PARAMETERS = {"021-aigodlike-wildcard-prompt-raw-newlines.txt"}  # A1111 cannot find its key line either
KEY_OF = {}
for _field, (_key, _, _) in A1111_KEYS.items():
    KEY_OF.setdefault(_key, []).append(_field)


def ignored(key: str, value: str) -> bool:
    return key in A1111_IGNORED or key in A1111_ADDON_KEYS or value.strip() in A1111_IGNORED_VALUES.get(key, ())


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 70


@pytest.mark.parametrize("path", [p for p in CORPUS if p.name not in NO_PARAMETERS], ids=lambda p: p.name[:40])
def test_every_key_is_reproduced_or_reported(path, tmp_path):
    text = path.read_text(encoding="utf-8")
    try:
        job_text, warnings = import_job(path, lenient=True)
    except InputError as e:  # a value of the picture itself: --lenient refuses too, and says why
        assert "--lenient" in str(e) and "\n" not in str(e), str(e)
        return
    job = parse_job(job_text, tmp_path / "job.yaml")
    [(_, recipe)] = job.expand({}, 512, 7.0)
    comments = "\n".join(line for line in job_text.splitlines() if line.startswith("#"))
    _, _, pairs = parse_infotext(text)
    wanted = a1111_values(text, lenient=True)
    dropped = wanted.pop("unreproduced")
    for key, value in pairs.items():
        if ignored(key, value):
            continue
        reported = f"{key}: " in comments or any(f"# {field} " in comments for field in KEY_OF.get(key, []))
        if key in dropped:
            assert reported, f"{key}: dropped silently"
        if reported:
            continue
        for field in KEY_OF[key]:
            if field in wanted:
                assert getattr(recipe, field) == wanted[field], (
                    f"{key}: {getattr(recipe, field)!r} != {wanted[field]!r}"
                )
    assert all(w.replace("\n", " ") in comments for w in warnings)
    # and our own infotext of the imported recipe reads back as the same recipe
    assert Recipe.from_a1111(recipe.to_a1111({"Model": "m"}, "0.1.0")) == recipe


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name[:40])
def test_strict_import_refuses_naming_what_it_cannot_reproduce(path):
    try:
        import_job(path)
    except InputError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        assert len(str(e)) > len(str(path)) + 10  # and says what


# --- the corpus from 033 on: what each file says, read off the text (A1111's meaning of its keys) -----
# Strict import with the text's Model hash replaced by the demo model's (so the rest is checked): a tuple
# is the A1111 fields it must refuse (exactly these), a text a fragment of the one-line error (an add-on
# these tests do not have, a size A1111's UI cannot give), None: it imports. SDXL and SD 2.x images
# (AS_IS) keep their own hash: sdbatch must refuse them, whatever it names.
ADDNET = ("Face restoration", "AddNet Enabled", "AddNet Module 1", "AddNet Model 1", "AddNet Weight A 1")
ADDNET += ("AddNet Weight B 1",)  # 061 and 062: kohya's Additional Networks extension, and CodeFormer
REFUSED = {
    "033": ("VAE hash", "VAE"),  # SDXL (Pony, Forge): refused for its VAE; no SDXL model is here either
    "034": "LoRA '(风格)线稿3.0animeLineartMangaLike_v30MangaLike' not found",
    "035": "LoRA 'hanfu29.1' not found",
    "036": "LoRA '(优化)细节调整add_detail' not found",
    "037": "size: 350x500: each side must be a multiple of 8",
    "038": "upscaler '4x-UltraSharp' not found",
    "039": None,
    "040": ("VAE",),
    "041": "upscaler '4x-UltraSharp' not found",
    "042": "the A1111 parameters lack Size",
    "043": "upscaler 'RealESRGAN_x4plus_anime_6B' not found",  # A1111's "R-ESRGAN 4x+ Anime6B"
    "044": "the parameters carry no Model hash",  # Created Date (civitai) is not among what it names
    "045": None,
    "046": None,
    "047": ("VAE", "NGMS", "XieS", "VAE hash", "Concordant-neg", "Vector_illustration"),  # civitai broke the quotes
    "048": None,  # Batch size, Batch pos: the image's own seed, its own noise
    "049": None,
    "050": ("VAE", "Face restoration"),
    "051": (  # Hashes (civitai's JSON) is not among them
        "ADetailer model",
        "ADetailer prompt",
        "ADetailer confidence",
        "ADetailer dilate erode",
        "ADetailer mask blur",
        "ADetailer denoising strength",
        "ADetailer inpaint only masked",
        "ADetailer inpaint padding",
        "ADetailer ControlNet model",
        "ADetailer ControlNet module",
        "ADetailer version",
        "ControlNet 0",
    ),
    "052": "cannot reproduce these A1111 fields yet: model, weight, resize mode, control mode, more_details",
    "053": None,
    "054": (
        "Face restoration",
        "ControlNet Enabled",
        "ControlNet Module",
        "ControlNet Model",
        "ControlNet Weight",
        "ControlNet Guidance Start",
        "ControlNet Guidance End",
    ),
    "055": ("Face restoration",),  # SD 2.1 768-v
    "056": None,
    "057": ("Face restoration",),
    "058": ("Face restoration",),  # Batch size is not among them
    "059": "no model with Model hash 4bdfc29c",  # SD 2.1 768-v
    "060": "no model with Model hash 4bdfc29c",
    "061": ADDNET,
    "062": ADDNET,
    "063": ("VAE hash", "VAE", "FreeU Stages", "FreeU Schedule", "FreeU Version"),
    "064": None,
    "065": None,
    "066": ("Face restoration", "Refiner", "Refiner switch at"),  # SDXL
    "067": "LoRA 'Pyramid lora_Ghibli_v2' not found",
    "068": None,
    "069": "LoRA 'LoconLoraAirconditioner_loraVersion' not found",
    "070": "size: 768x900: each side must be a multiple of 8",
    "071": (
        "Mimic scale",
        "AddNet Enabled",
        "AddNet Model 1",
        "AddNet Module 1",
        "AddNet Weight A 1",
        "AddNet Weight B 1",
        "Threshold percentile",
        "Dynamic thresholding enabled",
    ),
    "072": ("SD upscale overlap", "SD upscale upscaler"),  # an img2img script
    "073": ("TI",),  # Forge Neo; its `Hires Module 1: Use same choices` is not among them
}
AS_IS = {"033", "055", "059", "060", "066"}
NEW = [p for p in CORPUS if p.name[:3] >= "033"]


def test_every_new_corpus_file_has_an_expectation():
    assert sorted(p.name[:3] for p in NEW) == sorted(REFUSED)


@pytest.mark.parametrize("path", NEW, ids=lambda p: p.name[:40])
def test_each_new_corpus_file_imports_or_is_refused_as_its_text_says(path, tmp_path):
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    number = path.name[:3]
    if number not in AS_IS:
        text = re.sub(r"Model hash: [0-9a-fA-F]+", f"Model hash: {DEMO_HASH}", text)
    source = tmp_path / path.name
    source.write_bytes(text.encode())
    expected = REFUSED[number]
    if expected is None:
        job_text, _ = import_job(source)
        job = yaml.safe_load(job_text)
        _, _, pairs = parse_infotext(text)
        width, height = (int(v) for v in pairs["Size"].split("x"))
        # every value the text gives is in the job, whatever the job's model would default to
        assert (job["seed"], job["steps"], job["size"]) == (int(pairs["Seed"]), int(pairs["Steps"]), [width, height])
        assert job["cfg"] == float(pairs["CFG scale"]) and job["model"] == "demo"
        return
    with pytest.raises(InputError) as e:
        import_job(source)
    message = str(e.value)
    assert message.startswith(str(source)) and "\n" not in message
    if isinstance(expected, str):
        assert expected in message
    else:
        head = f"{source}: sdbatch cannot reproduce these A1111 fields yet: "
        assert message.startswith(head) and set(message.removeprefix(head).split(", ")) == set(expected)


# --- an image made with the demo model renders again --------------------------------------------


def test_an_image_made_with_the_demo_model_and_addons_imports_and_renders(tmp_path, monkeypatch):
    from sdbatch.addons.library import a1111_hash

    weights = tmp_path / "weights"
    (weights / "loras").mkdir(parents=True)
    (weights / "loras" / "demo-warp.safetensors").write_bytes((REPO / "jobs/loras/demo-warp.safetensors").read_bytes())
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(weights))
    lora_hash = a1111_hash(weights / "loras" / "demo-warp.safetensors")[:12]
    params = tmp_path / "params.txt"
    params.write_text(
        "a red circle <lora:demo-warp:0.5>\nNegative prompt: blurry\n"
        f"Steps: 4, Sampler: DPM++ 2M SDE Karras, CFG scale: 5, Seed: 77, Size: 32x32, Model hash: "
        f"{DEMO_HASH}, Model: demo, ENSD: 31337, "
        f'Lora hashes: "demo-warp: {lora_hash}", Version: v1.6.0'
    )
    job = tmp_path / "job.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "sdbatch", "import", str(params), "-o", str(job)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    text = job.read_text()
    assert "sampler: dpmpp_2m_sde" in text and "karras: true" in text and "compat: a1111" in text
    assert "rng: a1111" in text and "ensd: 31337" in text and "seed: 77" in text
    result = subprocess.run(
        [sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    [png] = (tmp_path / "out").glob("*.png")
    assert f'Lora hashes: "demo-warp: {lora_hash}"' in png.read_bytes().decode("latin-1")

    params.write_text(params.read_text().replace(lora_hash, "0123456789ab"))
    with pytest.raises(InputError, match="not the file the image was made with"):
        import_job(params)
    params.write_text(params.read_text() + ", ADetailer model: face_yolov8n.pt")
    with pytest.raises(InputError, match="cannot reproduce these A1111 fields yet: ADetailer model"):
        import_job(params)


def infotext(extra: str = "", sampler: str = "DPM++ 2M", prompt: str = "a red circle", tail: str = "") -> str:
    return (
        f"{prompt}\nNegative prompt: blurry\nSteps: 9, Sampler: {sampler}, CFG scale: 5, Seed: 7, Size: 64x64, "
        f"Model hash: {DEMO_HASH}, Model: demo{extra}{tail}"
    )


def imported(tmp_path: Path, text: str, **kwargs) -> tuple[str, list[str]]:
    source = tmp_path / "params.txt"
    source.write_text(text, encoding="utf-8")
    return import_job(source, **kwargs)


def recipe_of(tmp_path: Path, text: str) -> Recipe:
    job_text, _ = imported(tmp_path, text)
    [(_, recipe)] = parse_job(job_text, tmp_path / "job.yaml").expand({}, 32, 4.0)
    return recipe


# --- 1, 2: the schedule of a sampler name written before A1111 1.9 -----------------------------------


@pytest.fixture(scope="module")
def pipe():
    from sdbatch.pipeline import Pipeline

    return Pipeline.from_file("demo")


def oracle_sigmas(schedule: str, steps: int, discard: bool, downcast: bool = False) -> torch.Tensor:
    """A1111's `KDiffusionSampler.get_sigmas` over k-diffusion's `CompVisDenoiser` of SD 1.x's
    alphas_cumprod: the model's own sigmas (no scheduler option), or Karras / Exponential. With
    `downcast`, the alphas in fp16, as A1111 before v1.7.0-225 held them (k-diffusion then computes
    its sigmas and log sigmas in fp16)."""
    from test_kdiffusion import ALPHAS, kd

    denoiser = kd.external.DiscreteEpsDDPMDenoiser(None, ALPHAS.half() if downcast else ALPHAS, quantize=False)
    n = steps + 1 if discard else steps
    lo, hi = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    if schedule == "uniform":
        sigmas = denoiser.get_sigmas(n)
    else:
        make = {"karras": kd.sampling.get_sigmas_karras, "exponential": kd.sampling.get_sigmas_exponential}[schedule]
        sigmas = make(n=n, sigma_min=lo, sigma_max=hi, device="cpu")
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


# A1111 before 1.9, samplers_k_diffusion: name -> discard_next_to_last_sigma (none has a scheduler option)
PLAIN = {
    "Euler a": False,
    "Euler": False,
    "LMS": False,
    "Heun": False,
    "DPM2": True,
    "DPM2 a": True,
    "DPM++ 2S a": False,
    "DPM++ 2M": False,
    "DPM++ SDE": False,
    "DPM++ 2M SDE": False,
    "DPM++ 2M SDE Heun": False,
    "DPM++ 3M SDE": True,
}
SUFFIXED = [(f"{name} {suffix}", suffix.lower(), discard) for name, discard in PLAIN.items() for suffix in ("Karras",)]
SUFFIXED += [
    (f"{name} Exponential", "exponential", PLAIN[name])
    for name in ("DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE")
]


def assert_same_sigmas(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", PLAIN)
def test_a_sampler_named_before_1_9_without_karras_walks_the_models_own_sigmas(pipe, tmp_path, name):
    recipe = recipe_of(tmp_path, infotext(", Version: v1.6.0", sampler=name))
    _, plan = pipe._plan(recipe)
    assert_same_sigmas(plan.sigmas, oracle_sigmas("uniform", 9, PLAIN[name], downcast=True))


@pytest.mark.parametrize(("name", "schedule", "discard"), SUFFIXED, ids=[s[0] for s in SUFFIXED])
def test_a_karras_or_exponential_name_before_1_9_walks_that_schedule(pipe, tmp_path, name, schedule, discard):
    recipe = recipe_of(tmp_path, infotext(", Version: v1.7.0", sampler=name))
    _, plan = pipe._plan(recipe)
    assert_same_sigmas(plan.sigmas, oracle_sigmas(schedule, 9, discard, downcast=True))


def test_since_1_9_automatic_is_the_samplers_own_choice(pipe, tmp_path):
    # A1111 1.9+ writes Schedule type always; Automatic for DPM++ 2M is Karras (its scheduler option)
    recipe = recipe_of(tmp_path, infotext(", Schedule type: Automatic, Version: v1.10.1", sampler="DPM++ 2M"))
    assert_same_sigmas(pipe._plan(recipe)[1].sigmas, oracle_sigmas("karras", 9, False))
    recipe = recipe_of(tmp_path, infotext(", Schedule type: Uniform, Version: v1.10.1", sampler="DPM++ 2M"))
    assert_same_sigmas(pipe._plan(recipe)[1].sigmas, oracle_sigmas("uniform", 9, False))


HIRES = ", Denoising strength: 0.5, Hires upscale: 2, Hires steps: 6, Hires upscaler: Latent"


HIRES_SAMPLERS = [
    ("DPM++ 2M", "uniform", False),
    ("Euler a", "uniform", False),
    ("DPM2", "uniform", True),
    ("DPM++ SDE Karras", "karras", False),
    ("DPM++ 3M SDE Exponential", "exponential", True),
]


@pytest.mark.parametrize(("hires_sampler", "schedule", "discard"), HIRES_SAMPLERS)
def test_a_hires_sampler_before_1_9_walks_its_own_sigmas_not_the_first_passs(
    pipe, tmp_path, hires_sampler, schedule, discard
):
    text = infotext(f"{HIRES}, Hires sampler: {hires_sampler}, Version: v1.6.0", sampler="DPM++ 2M Karras")
    recipe = recipe_of(tmp_path, text)
    assert_same_sigmas(pipe._plan(recipe)[1].sigmas, oracle_sigmas("karras", 9, False, downcast=True))
    second = pipe._plan(recipe.second_pass())[1].sigmas
    assert_same_sigmas(second, oracle_sigmas(schedule, 6, discard, downcast=True))


def test_a_hires_sampler_since_1_9_keeps_the_schedule_type_it_does_not_override(pipe, tmp_path):
    text = infotext(f"{HIRES}, Schedule type: Karras, Hires sampler: Euler, Version: v1.10.1", sampler="DPM++ 2M")
    recipe = recipe_of(tmp_path, text)
    assert_same_sigmas(pipe._plan(recipe.second_pass())[1].sigmas, oracle_sigmas("karras", 6, False))


@pytest.mark.parametrize(
    ("version", "downcast"),
    [
        ("v1.6.0", True),
        ("v1.7.0", True),
        ("v1.7.0-RC-5-g1234567", True),
        ("v1.7.0-224-g1234567", True),
        ("v1.7.0-225-g1234567", False),  # A1111's v170_tsnr: from here its alphas stay fp32
        ("v1.10.1", False),
        ("f2.0.1v1.10.1-previous-669-gdfdcbab6", False),  # A1111 cannot read it: no backcompat
        (None, False),  # no Version at all: none either
    ],
)
def test_texts_before_1_7_render_with_the_fp16_alphas_a1111_used_then(pipe, tmp_path, version, downcast):
    tail = "" if version is None else f", Version: {version}"
    recipe = recipe_of(tmp_path, infotext(tail, sampler="DPM++ 2M Karras"))
    assert recipe.downcast_alphas is downcast
    assert_same_sigmas(pipe._plan(recipe)[1].sigmas, oracle_sigmas("karras", 9, False, downcast=downcast))
    # the schedule really differs: sigma_min 0.0313 against 0.0292
    assert not torch.allclose(oracle_sigmas("karras", 9, False, True), oracle_sigmas("karras", 9, False, False))


def test_downcast_alphas_written_by_a1111_is_read_and_written_back(tmp_path):
    recipe = recipe_of(tmp_path, infotext(", Downcast alphas_cumprod: True, Version: v1.10.1", sampler="Euler"))
    assert recipe.downcast_alphas
    assert "Downcast alphas_cumprod: True" in recipe.to_a1111({"hash": "0", "name": "demo"}, "sdbatch")
    with pytest.raises(InputError, match="must be True or False"):
        imported(tmp_path, infotext(", Downcast alphas_cumprod: yes"))


@pytest.mark.parametrize(
    ("tail", "refused"),
    [
        (", Version: v1.5.2", None),  # an edit at a fraction below 1: both timelines agree
        (", Version: v1.5.2, Sampler: x", None),
        (HIRES + ", Version: v1.5.2", "Old prompt editing timelines"),  # hires: the second pass differs
        (", Version: v1.6.0" + HIRES, None),  # 1.6 on: the new timeline
    ],
)
def test_the_old_prompt_editing_timeline_is_refused_where_it_changes_the_picture(tmp_path, tail, refused):
    text = infotext(tail.replace(", Sampler: x", ""), prompt="a [red:blue:0.5] circle, [small]")
    if refused is None:
        imported(tmp_path, text)
    else:
        with pytest.raises(InputError, match=f"{refused} \\(A1111 implies it for Version v1.5.2\\)"):
            imported(tmp_path, text)
    with pytest.raises(InputError, match="Old prompt editing timelines"):  # a step written 2.0: step 2, not 2*9
        imported(tmp_path, infotext(", Version: v1.5.2", prompt="a [red:blue:2.0] circle"))
    imported(tmp_path, infotext(", Version: v1.5.2", prompt="a [red:blue:2] circle, [[small]]"))


def test_ddim_before_1_6_is_refused_for_its_pad_conds_v0(tmp_path):
    with pytest.raises(InputError, match=r"Pad conds v0 \(A1111 implies it for Version v1.5.1\)"):
        imported(tmp_path, infotext(", Version: v1.5.1", sampler="DDIM"))
    imported(tmp_path, infotext(", Version: v1.6.0", sampler="DDIM"))


def test_a_suffixed_sampler_in_a_1_9_text_leaves_the_hires_sampler_on_the_first_passs_schedule(tmp_path):
    text = infotext(
        f"{HIRES}, Schedule type: Karras, Hires sampler: DPM++ 2M, Version: v1.10.1", sampler="DPM++ 2M Karras"
    )
    recipe = recipe_of(tmp_path, text)
    assert recipe.karras and recipe.second_pass().karras  # A1111's "Use same scheduler", not 1.8's Uniform


def test_a_schedule_in_the_sampler_name_wins_over_schedule_type(tmp_path):
    recipe = recipe_of(
        tmp_path, infotext(", Schedule type: Karras, Version: v1.10.1", sampler="DPM++ 2M SDE Exponential")
    )
    assert (recipe.schedule, recipe.karras) == ("exponential", False)


def test_a_negative_seed_is_its_64_bit_twos_complement_and_minus_1_is_refused(tmp_path):
    recipe = recipe_of(tmp_path, infotext().replace("Seed: 7", "Seed: -353763303"))
    assert recipe.seed == 2**64 - 353763303
    with pytest.raises(InputError, match="seed: -1 is out of range"):  # A1111's "random": no seed is known
        imported(tmp_path, infotext().replace("Seed: 7", "Seed: -1"))


def test_ddim_plms_and_unipc_take_no_schedule_before_1_9_either(tmp_path):
    for name in ("DDIM", "PLMS", "UniPC"):
        recipe = recipe_of(tmp_path, infotext(", Version: v1.6.0", sampler=name))
        assert (recipe.schedule, recipe.karras) == ("automatic", False)


def test_the_pre_1_9_table_is_samplers_sigmas_automatic():
    """The torch-free list of samplers whose plain name changed meaning in 1.9 is exactly those whose
    "Automatic" (A1111 1.10's scheduler option) is not the model's own sigmas."""
    from sdbatch.recipe import _UNIFORM_BEFORE_1_9
    from sdbatch.samplers import SAMPLERS
    from sdbatch.samplers.sigmas import AUTOMATIC

    changed = {s.name for s in SAMPLERS.values() if AUTOMATIC.get(s.a1111, "uniform") != "uniform"}
    assert changed == _UNIFORM_BEFORE_1_9


# --- 3: fields that do not change the picture ------------------------------------------------------

NOTHING = (
    ", Batch size: 4, Batch pos: 3, Created Date: 2024-06-01T1212:20.9443792Z"
    ', Hashes: {"model": "efc1dc8947"}, Civitai resources: [{"type":"checkpoint","modelVersionId":128713}]'
    ", Civitai metadata: {}, Token merging ratio: 0, Hires sampler: Use same sampler"
    ", Hires checkpoint: Use same checkpoint, Hires schedule type: Use same scheduler"
    ", Hires Module 1: Use same choices"
)


def test_fields_that_do_not_change_the_picture_are_ignored(tmp_path):
    for extra in ("", HIRES):
        plain, _ = imported(tmp_path, infotext(extra))
        busy, warnings = imported(tmp_path, infotext(extra + NOTHING))
        assert busy == plain and warnings == []


@pytest.mark.parametrize(
    "field",
    [
        "Token merging ratio: 0.5",
        "Hires checkpoint: other_model",
        "Hires Module 1: Built-in",
        "Hires sampler: DPM fast",
        "Hires schedule type: Turbo",
    ],
)
def test_the_same_fields_with_a_real_value_are_still_refused(tmp_path, field):
    with pytest.raises(InputError, match=re.escape(field.split(":")[0])):
        imported(tmp_path, infotext(f"{HIRES}, {field}"))


def test_a_stale_lora_or_ti_hash_warns_but_a_used_network_is_still_checked(tmp_path, monkeypatch):
    from sdbatch.addons.library import a1111_hash

    weights = tmp_path / "weights"
    (weights / "loras").mkdir(parents=True)
    lora = weights / "loras" / "demo-warp.safetensors"
    lora.write_bytes((REPO / "jobs/loras/demo-warp.safetensors").read_bytes())
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(weights))
    stale = ', Lora hashes: "other_lora: 0123456789ab", TI hashes: "badhandv4: 5e40d722fc3d"'
    job, warnings = imported(tmp_path, infotext(stale))
    assert [w.split(",")[0] for w in warnings] == [
        "Lora hashes names 'other_lora'",
        "TI hashes names 'badhandv4'",
    ]
    assert all(f"# {w}" in job for w in warnings)
    short = a1111_hash(lora)[:12]
    used = f', Lora hashes: "demo-warp: {short}, other_lora: 0123456789ab"'
    _, warnings = imported(tmp_path, infotext(used, prompt="a red circle <lora:demo-warp:0.5>"))
    assert len(warnings) == 1
    with pytest.raises(InputError, match="not the file the image was made with"):
        imported(tmp_path, infotext(used.replace(short, "0123456789ab"), prompt="a red circle <lora:demo-warp:0.5>"))
    # an embedding its negative prompt names, missing here: rendering without it gives another picture
    with pytest.raises(InputError, match="embedding 'blurry'"):
        imported(tmp_path, infotext(', TI hashes: "blurry: 5e40d722fc3d"'))


# --- 4: --lenient never replaces the picture's own values ------------------------------------------

CORE_BREAKS = {
    "AND in the prompt": infotext(prompt="a red circle AND a blue square"),
    "a size A1111's UI cannot give": infotext().replace("Size: 64x64", "Size: 350x500"),
    "a negative seed": infotext().replace("Seed: 7", "Seed: -1"),
    "a float seed": infotext().replace("Seed: 7", "Seed: 7.0"),
    "zero steps": infotext().replace("Steps: 9", "Steps: 0"),
    "CFG scale that is not a number": infotext().replace("CFG scale: 5", "CFG scale: high"),
    "an unknown sampler": infotext(sampler="DPM fast"),
    "an unknown schedule type": infotext(", Schedule type: Turbo"),
    "img2img (no init image)": infotext(", Denoising strength: 0.5"),
    "a pre-1.0 hires fix": infotext(", Denoising strength: 0.5, First pass size: 0x0"),
    "variants in the prompt": infotext(prompt="a {red|blue} circle"),
    "a hires fix with no denoise": infotext(", Hires upscale: 2, Hires upscaler: Latent"),
    "A1111's LCM (compat would be reset)": infotext(", Schedule type: Automatic, Version: v1.10.1", sampler="LCM"),
    "an upscaler sdbatch cannot run": infotext(HIRES.replace("Latent", "SwinIR 4x")),
    "ENSD out of range": infotext(", ENSD: 4294967295"),
    "Seed resize from of no size": infotext(", Seed resize from: 500x700"),
}


@pytest.mark.parametrize("text", CORE_BREAKS.values(), ids=CORE_BREAKS)
def test_lenient_refuses_what_it_would_have_to_replace_by_a_default(tmp_path, text):
    source = tmp_path / "params.txt"
    source.write_text(text + ", ADetailer model: face_yolov8n.pt")
    result = subprocess.run(
        [sys.executable, "-m", "sdbatch", "import", str(source), "--lenient"], capture_output=True, text=True
    )
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "--lenient" in result.stderr


def test_lenient_still_leaves_out_an_extensions_fields(tmp_path):
    job, warnings = imported(tmp_path, infotext(", ADetailer model: face_yolov8n.pt"), lenient=True)
    assert warnings == ["not reproduced: ADetailer model: face_yolov8n.pt"]
    assert "# not reproduced: ADetailer model: face_yolov8n.pt" in job


# --- 5: numbers that are not finite ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "NaN"])
@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("CFG scale", infotext().replace("CFG scale: 5", "CFG scale: {}")),
        ("Denoising strength", infotext(HIRES.replace("0.5", "{}"))),
        ("Denoising strength", infotext(HIRES.replace("0.5", "{}") + ", Compat: diffusers")),
        ("Variation seed strength", infotext(", Variation seed: 3, Variation seed strength: {}")),
        ("Hires upscale", infotext(HIRES.replace("upscale: 2", "upscale: {}"))),
        ("Hires CFG Scale", infotext(HIRES + ", Hires CFG Scale: {}")),
    ],
)
def test_a_number_that_is_not_finite_is_refused_naming_its_key(tmp_path, key, text, value):
    for lenient in (False, True):
        with pytest.raises(InputError) as e:
            imported(tmp_path, text.format(value), lenient=lenient)
        assert f"{key}: '{value}': not a finite number" in str(e.value) and "\n" not in str(e.value)


def test_rerun_of_an_a1111_png_with_a_nan_denoise_says_so_in_one_line(tmp_path):
    from PIL import Image

    from sdbatch.output.png import png_bytes

    png = tmp_path / "a1111.png"
    png.write_bytes(png_bytes(Image.new("RGB", (8, 8)), {"parameters": infotext(HIRES.replace("0.5", "nan"))}))
    result = subprocess.run(
        [sys.executable, "-m", "sdbatch", "rerun", str(png), "--model", "demo", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Denoising strength: 'nan': not a finite number" in result.stderr


# --- 6: variants and wildcards in the hires prompts ------------------------------------------------


@pytest.mark.parametrize("field", ["Hires prompt", "Hires negative prompt"])
@pytest.mark.parametrize("value", ["a {red|blue} circle", "a __colors__ circle"])
def test_variants_or_wildcards_in_a_hires_prompt_are_refused(tmp_path, field, value):
    for lenient in (False, True):
        with pytest.raises(InputError, match=f"the {field} holds"):
            imported(tmp_path, infotext(f'{HIRES}, {field}: "{value}"'), lenient=lenient)


# --- 7: where the job is written -------------------------------------------------------------------


def test_an_output_that_cannot_name_a_job_file_is_one_line(tmp_path):
    source = tmp_path / "params.txt"
    source.write_text(infotext())
    (tmp_path / "folder").mkdir()
    for output, says in [
        (Path(""), "name the job file to write"),
        (tmp_path / "folder", "is a folder"),
        (tmp_path / "missing" / "job.yaml", "does not exist"),
    ]:
        with pytest.raises(InputError, match=says) as e:
            import_job(source, output=output)
        assert "\n" not in str(e.value) and ".tmp-" not in str(e.value)
    import_job(source, output=tmp_path / "folder" / "job.yaml")
    assert (tmp_path / "folder" / "job.yaml").read_text().startswith("# imported from")


def test_the_cli_says_why_it_cannot_write_the_job(tmp_path):
    source = tmp_path / "params.txt"
    source.write_text(infotext())
    (tmp_path / "folder").mkdir()
    for output in ("", str(tmp_path / "folder"), str(tmp_path / "missing" / "job.yaml")):
        result = subprocess.run(
            [sys.executable, "-m", "sdbatch", "import", str(source), "-o", output], capture_output=True, text=True
        )
        assert result.returncode == 2, (output, result.stderr)
        assert "Traceback" not in result.stderr and ".tmp-" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --- 8: the model, from wherever the job is validated ----------------------------------------------


def test_the_jobs_model_resolves_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SDBATCH_WEIGHTS")  # the default: ./weights, relative to the working folder
    monkeypatch.chdir(REPO)
    source = tmp_path / "params.txt"
    source.write_text(infotext())
    (tmp_path / "jobs").mkdir()
    import_job(source, output=tmp_path / "jobs" / "shipped.yaml")
    # a model of the user's own weights folder, given relative to the working folder
    mine = tmp_path / "work" / "w"
    mine.mkdir(parents=True)
    shutil.copyfile(DEMO, mine / "mine.safetensors")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("SDBATCH_WEIGHTS", "w")
    source.write_text(infotext().replace("Model: demo", "Model: mine"))
    import_job(source, output=tmp_path / "jobs" / "mine.yaml")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(elsewhere / "no-weights"))
    for name, expected in (("shipped", DEMO), ("mine", tmp_path / "work" / "w" / "mine.safetensors")):
        job = load_job(tmp_path / "jobs" / f"{name}.yaml")
        assert resolve_model(job.model).resolve() == expected.resolve()


# --- 9: every value the infotext gives is in the job -----------------------------------------------


def test_values_at_sdbatchs_defaults_are_written_too(tmp_path):
    text = infotext().replace("Size: 64x64", "Size: 512x512").replace("CFG scale: 5", "CFG scale: 7.5")
    text = text.replace("Steps: 9", "Steps: 30").replace("Sampler: DPM++ 2M", "Sampler: Euler a")
    job_text, _ = imported(tmp_path, text.replace("Seed: 7", "Seed: 0") + ", Clip skip: 1")
    job = yaml.safe_load(job_text)
    assert (job["size"], job["cfg"], job["steps"], job["sampler"], job["seed"]) == ([512, 512], 7.5, 30, "euler_a", 0)
    assert job["clip_skip"] == 1
    # the demo model's own size and CFG (32x32, cfg 4) do not replace them
    [(_, recipe)] = parse_job(job_text, tmp_path / "job.yaml").expand({}, 32, 4.0)
    assert (recipe.size, recipe.cfg) == ((512, 512), 7.5)
    hires = yaml.safe_load(imported(tmp_path, infotext(HIRES))[0])["hires"]
    assert hires == {"scale": 2.0, "upscaler": "latent", "steps": 6, "denoise": 0.5}
    assert math.isclose(yaml.safe_load(imported(tmp_path, infotext())[0])["cfg"], 5.0)


def test_emphasis_ignore_is_a1111s_ignore_not_none(tmp_path):
    """A1111's Ignore still parses the brackets (its None hands them to CLIP as text)."""
    assert recipe_of(tmp_path, infotext(", Emphasis: Ignore, Version: v1.10.1")).emphasis == "ignore"
    assert recipe_of(tmp_path, infotext(", Emphasis: None, Version: v1.10.1")).emphasis == "none"


@pytest.mark.parametrize("suffix", ["jpg", "webp"])
@pytest.mark.parametrize("prefix", [b"UNICODE\0", b"ASCII\0\0\0", b""])
def test_a_jpeg_or_webp_imports_from_its_exif_user_comment(tmp_path, suffix, prefix):
    """A1111 saves JPEG and WebP with the infotext in EXIF UserComment (piexif: "UNICODE" and
    UTF-16 big-endian); civitai serves many images so. Read as A1111's read_info_from_image reads it."""
    from PIL import Image

    text = infotext(", Version: v1.10.1", prompt="a red circle, 東京")
    encoding = {b"UNICODE\0": "utf_16_be", b"ASCII\0\0\0": "ascii"}.get(prefix, "utf-8")
    if encoding == "ascii":
        text = text.replace(", 東京", "")
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = prefix + text.encode(encoding)
    image = tmp_path / f"a1111.{suffix}"
    Image.new("RGB", (32, 32), "red").save(image, exif=exif)
    job = yaml.safe_load(import_job(image)[0])
    assert (job["prompt"], job["seed"], job["steps"]) == (parse_infotext(text)[0], 7, 9)
    bare = tmp_path / f"bare.{suffix}"
    Image.new("RGB", (32, 32), "red").save(bare)
    with pytest.raises(InputError, match="carries no A1111 parameters"):
        import_job(bare)
