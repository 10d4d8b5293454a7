"""`sdbatch import` on the corpus of real A1111 infotexts (tests/data/infotexts): every key is either
reproduced (the job's recipe holds its value, and our infotext gives it back) or reported (a comment
in the job, a warning); strict mode refuses naming the keys; an image made with the demo model, a
LoRA and an embedding imports into a job that renders."""

import subprocess
import sys
from pathlib import Path

import pytest

from sdbatch.errors import InputError
from sdbatch.importer import import_job
from sdbatch.jobs import parse_job
from sdbatch.output.a1111 import parse_infotext
from sdbatch.recipe import A1111_ADDON_KEYS, A1111_IGNORED, A1111_KEYS, Recipe, a1111_values

REPO = Path(__file__).resolve().parent.parent
CORPUS = sorted((REPO / "tests" / "data" / "infotexts").glob("*.txt"))
NO_PARAMETERS = {"021-aigodlike-wildcard-prompt-raw-newlines.txt"}  # A1111 cannot find its key line either
KEY_OF = {}
for _field, (_key, _, _) in A1111_KEYS.items():
    KEY_OF.setdefault(_key, []).append(_field)


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", [p for p in CORPUS if p.name not in NO_PARAMETERS], ids=lambda p: p.name[:40])
def test_every_key_is_reproduced_or_reported(path, tmp_path):
    text = path.read_text(encoding="utf-8")
    job_text, warnings = import_job(path, lenient=True)
    job = parse_job(job_text, tmp_path / "job.yaml")
    [(_, recipe)] = job.expand({}, 512, 7.0)
    comments = "\n".join(line for line in job_text.splitlines() if line.startswith("#"))
    _, _, pairs = parse_infotext(text)
    wanted = a1111_values(text, lenient=True)
    dropped = wanted.pop("unreproduced")
    for key in pairs:
        if key in A1111_IGNORED or key in A1111_ADDON_KEYS:
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


def test_an_image_made_with_the_demo_model_and_addons_imports_and_renders(tmp_path, monkeypatch):
    from sdbatch.addons.library import a1111_hash
    from sdbatch.checkpoints import model_hash

    weights = tmp_path / "weights"
    (weights / "loras").mkdir(parents=True)
    (weights / "loras" / "demo-warp.safetensors").write_bytes((REPO / "jobs/loras/demo-warp.safetensors").read_bytes())
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(weights))
    lora_hash = a1111_hash(weights / "loras" / "demo-warp.safetensors")[:12]
    params = tmp_path / "params.txt"
    params.write_text(
        "a red circle <lora:demo-warp:0.5>\nNegative prompt: blurry\n"
        f"Steps: 4, Sampler: DPM++ 2M SDE Karras, CFG scale: 5, Seed: 77, Size: 32x32, Model hash: "
        f"{model_hash(REPO / 'weights/demo/model.safetensors')}, Model: demo, ENSD: 31337, "
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
