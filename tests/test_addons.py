"""LoRAs and embeddings in jobs, end to end with the demo model: the `lora` key and its sweeps,
`<lora:...>` tags, each set merged once per worker and restored exactly, ids that follow the files'
contents, A1111's `Lora hashes` / `TI hashes`, `rerun` finding the files again, and every bad add-on
refused at validate time with its job file line, before anything renders."""

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdbatch.addons import merge
from sdbatch.addons.library import Folders, Library
from sdbatch.jobs import JobError, load_job
from sdbatch.output.a1111 import parse_infotext
from sdbatch.output.png import read_png_text
from sdbatch.pipeline import Pipeline, Request
from sdbatch.plan import plan_job
from sdbatch.recipe import Recipe
from sdbatch.rerun import rerun_image
from sdbatch.runner import Options, Reporter, run_job

REPO = Path(__file__).resolve().parent.parent
LORA = REPO / "jobs" / "loras" / "demo-warp.safetensors"
EMBEDDING = REPO / "jobs" / "embeddings" / "roundthing.safetensors"
PROMPT = "a red circle on a blue background"


@pytest.fixture
def addons(tmp_path: Path) -> Path:
    """A job folder with its own loras/ and embeddings/ (copies of the example add-ons)."""
    for folder, source in (("loras", LORA), ("embeddings", EMBEDDING)):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / source.name)
    return tmp_path


def write_job(folder: Path, body: str) -> Path:
    path = folder / "job.yaml"
    head = "model: demo\nlora_folder: loras\nembedding_folder: embeddings\noutput: out\nfilename: '{index}'\n"
    path.write_text(head + body)
    return path


def render(job: Path, **options) -> list[dict]:
    summary = run_job(load_job(job), Options(device="cpu", **options), Reporter())
    assert summary.exit_code == 0, summary
    lines = (job.parent / "out" / "manifest.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda e: e["index"])


def pixels(folder: Path, entry: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / "out" / entry["file"]))


def test_a_weight_sweep_is_an_axis_and_weight_zero_is_the_plain_model(addons):
    job = write_job(
        addons,
        f"defaults: {{steps: 4, seed: [1, 2]}}\nruns:\n  - prompt: {PROMPT}\n    lora:\n      demo-warp: 0.0-1.0 [3]\n"
        f"  - prompt: {PROMPT}\n  - prompt: {PROMPT} <lora:demo-warp:0.5>\n",
    )
    entries = render(job, batch_size=1)
    sweep = [e for e in entries if e["run"] == 0]
    assert [(e["lora"][0][1], e["seed"]) for e in sweep] == [(w, s) for w in (0.0, 0.5, 1.0) for s in (1, 2)]
    plain = {e["seed"]: pixels(addons, e) for e in entries if e["run"] == 1}
    tagged = {e["seed"]: pixels(addons, e) for e in entries if e["run"] == 2}
    for e in sweep:
        image = pixels(addons, e)
        if e["lora"][0][1] == 0.0:
            assert np.array_equal(image, plain[e["seed"]]), "weight 0 must be the model itself, bitwise"
        else:
            assert np.abs(image.astype(int) - plain[e["seed"]]).mean() > 1, "the LoRA must change the picture"
        if e["lora"][0][1] == 0.5:
            assert np.array_equal(image, tagged[e["seed"]]), "<lora:demo-warp:0.5> is lora: {demo-warp: 0.5}"
    sheet = Image.open(addons / "out" / "sheets" / "run0.png")
    assert sheet.height > 3 * 32, "one sheet row per weight"


def test_lora_sets_a_none_b_a_render_as_each_set_alone():
    """One pipeline through LoRA sets A, none, B, A equals a fresh pipeline per set; after going
    back to no LoRA every weight is bitwise the original."""
    a = (("demo-warp", 0.8, 0.8),)
    b = (("demo-warp", -0.6, 1.2),)
    sets = [a, (), b, a]
    library = Library(Folders.of(LORA.parent))

    def request(loras) -> Request:
        recipe = Recipe(prompt=PROMPT, size=(32, 32), steps=3, seed=5, lora=loras)
        return Request(recipe, addons=library.addons(recipe.loras(), recipe.prompt, recipe.negative, recipe.steps))

    pipe = Pipeline.from_file("demo")
    original = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    together = [np.asarray(pipe.render([request(s)])[0].image) for s in sets]
    pipe.use_loras(())
    assert all(torch.equal(v, original[k]) for k, v in pipe.model.state_dict().items()), "restored bitwise"
    for loras, image in zip(sets, together, strict=True):
        alone = Pipeline.from_file("demo").render([request(loras)])[0].image
        assert np.array_equal(np.asarray(alone), image)
    assert not np.array_equal(together[0], together[1]) and not np.array_equal(together[0], together[2])


def test_each_lora_set_is_merged_once_per_job_whatever_the_order_of_runs(addons, monkeypatch):
    merges: list[tuple] = []
    real = merge.Merger._merge

    def counting(self, loras):
        merges.append(tuple((f.path.name, te, unet) for f, te, unet in loras))
        return real(self, loras)

    monkeypatch.setattr(merge.Merger, "_merge", counting)
    runs = "".join(f"  - prompt: {PROMPT}\n    lora: {{demo-warp: {w}}}\n" for w in (0.3, 0.9, 0.3, 0.9, 0.3))
    job = write_job(addons, f"defaults: {{steps: 2, seed: 1-3}}\nruns:\n{runs}")
    entries = render(job, batch_size=1)
    assert len(entries) == 6  # runs 2-4 repeat runs 0-1: the same tasks, merged
    assert [w for ((_, w, _),) in merges] == [0.3, 0.9], merges


def test_task_ids_follow_the_lora_file_contents_and_weights(addons):
    job = write_job(addons, f"steps: 2\nprompt: {PROMPT}\nlora: {{demo-warp: 0.5}}\n")
    first = plan_job(load_job(job)).tasks[0]
    job.write_text(job.read_text().replace("0.5", "0.6"))
    assert plan_job(load_job(job)).tasks[0].id != first.id
    job.write_text(job.read_text().replace("0.6", "0.5"))
    data = bytearray((addons / "loras" / LORA.name).read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (addons / "loras" / LORA.name).write_bytes(bytes(data))
    again = plan_job(load_job(job)).tasks[0]
    assert again.id != first.id and again.addons.loras[0].sha256 == hashlib.sha256(data).hexdigest()


def addnet_hash(path: Path) -> str:
    """A1111's hash of a .safetensors LoRA, written out here: sha256 after the 8-byte length and header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def test_infotext_has_a1111s_lora_and_ti_hashes_and_the_lora_as_a_tag(addons):
    job = write_job(addons, "steps: 2\nprompt: a red roundthing on a blue background\nlora: {demo-warp: 0.5}\n")
    [entry] = render(job)
    text = read_png_text(addons / "out" / entry["file"])
    prompt, _, pairs = parse_infotext(text["parameters"])
    assert prompt == "a red roundthing on a blue background<lora:demo-warp:0.5>"
    assert pairs["Lora hashes"] == f"demo-warp: {addnet_hash(LORA)[:12]}"
    assert pairs["TI hashes"] == f"roundthing: {hashlib.sha256(EMBEDDING.read_bytes()).hexdigest()[:12]}"
    chunk = json.loads(text["sdbatch"])["task"]["addons"]
    assert chunk["loras"][0]["sha256"] == hashlib.sha256(LORA.read_bytes()).hexdigest()
    assert chunk["embeddings"][0]["name"] == "roundthing"


def test_rerun_finds_the_addons_and_refuses_a_changed_or_missing_file(addons):
    job = write_job(addons, "steps: 2\nprompt: a red roundthing <lora:demo-warp:0.7>\n")
    [entry] = render(job)
    image = addons / "out" / entry["file"]
    again = rerun_image(image, addons / "again", device="cpu")
    assert np.array_equal(np.asarray(Image.open(again)), pixels(addons, entry))

    lora = addons / "loras" / LORA.name
    save_file({"x": torch.zeros(1)}, lora)  # same name, other contents
    with pytest.raises(Exception, match="not the file the image was made with"):
        rerun_image(image, addons / "third", device="cpu")
    os.remove(lora)
    with pytest.raises(Exception, match="LoRA 'demo-warp' not found"):
        rerun_image(image, addons / "third", device="cpu")


def test_rerun_of_an_a1111_infotext_checks_lora_hashes(addons, monkeypatch):
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(addons))  # rerun looks in $SDBATCH_WEIGHTS/loras
    infotext = (
        "a red circle <lora:demo-warp:0.5>\nSteps: 2, Sampler: Euler a, CFG scale: 4, Seed: 3, Size: 32x32, "
        'Model: demo, Lora hashes: "demo-warp: 0123456789ab"'
    )
    from sdbatch.output.png import png_bytes

    image = addons / "a1111.png"
    image.write_bytes(png_bytes(Image.new("RGB", (32, 32)), {"parameters": infotext}))
    with pytest.raises(Exception, match="not the file the image was made with"):
        rerun_image(image, addons / "out", model="demo", device="cpu")
    image.write_bytes(
        png_bytes(Image.new("RGB", (32, 32)), {"parameters": infotext.replace("0123456789ab", addnet_hash(LORA)[:12])})
    )
    assert rerun_image(image, addons / "out", model="demo", device="cpu").is_file()


# ----------------------------------------------------------------------------------------------------
# bad add-ons: a JobError naming the job file's line, before anything is rendered


def _kohya_pair(name: str, shape_in: int, shape_out: int) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.zeros(2, shape_in), f"{name}.lora_up.weight": torch.zeros(shape_out, 2)}


class _Code:
    def __reduce__(self):
        return (os.system, ("touch MARKER",))


def _bad_loras(folder: Path) -> dict[str, str]:
    """name -> what the error must say."""
    save_file(_kohya_pair("lora_unet_no_such_block_attn1_to_q", 48, 48), folder / "unknown.safetensors")
    save_file(_kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768), folder / "xl.safetensors")
    (folder / "cut.safetensors").write_bytes(LORA.read_bytes()[:5000])
    (folder / "evil.pt").write_bytes(pickle.dumps({"x": _Code()}))
    (folder / "empty.safetensors").write_bytes(b"")
    return {
        "unknown": "not in this model",
        "xl": "SDXL",
        "cut": "truncated",
        "evil": "pickle",
        "empty": "empty",
    }


@pytest.mark.parametrize("how", ["key", "tag"])
def test_bad_lora_files_are_refused_with_the_line_that_names_them(addons, how, monkeypatch):
    monkeypatch.chdir(addons)
    cases = _bad_loras(addons / "loras")
    for name, message in cases.items():
        body = (
            f"steps: 2\nprompt: {PROMPT}\nlora: {{{name}: 1}}\n"
            if how == "key"
            else f"prompt: {PROMPT} <lora:{name}:1>\n"
        )
        job = write_job(addons, body)
        with pytest.raises(JobError) as e:
            plan_job(load_job(job))
        line = 8 if how == "key" else 6
        assert f"job.yaml:{line}: {'lora' if how == 'key' else 'prompt'}: LoRA {name!r}" in str(e.value), str(e.value)
        assert message.lower() in str(e.value).lower(), (name, str(e.value))
    assert not (addons / "MARKER").exists(), "the pickle's code ran"
    assert not (addons / "out").exists(), "nothing may be written"


def test_bad_embeddings_and_names_are_refused(addons):
    save_file({"emb_params": torch.zeros(1, 1024)}, addons / "embeddings" / "wideone.safetensors")
    cases = {
        f"prompt: {PROMPT}\nnegative: wideone\n": ("job.yaml:7: negative: embedding 'wideone'", "1024"),
        f"prompt: {PROMPT} <lora:nothere:1>\n": ("job.yaml:6: prompt: LoRA 'nothere' not found", "loras"),
        f"prompt: {PROMPT} <hypernet:x:1>\n": ("job.yaml:6: prompt:", "hypernet"),
        f"prompt: {PROMPT} <lora:demo-warp:1>\nlora: {{demo-warp: 1}}\n": ("lora: LoRA 'demo-warp' is named twice", ""),
        f"prompt: {PROMPT}\nlora: {{../demo-warp: 1}}\n": ("job.yaml:7: lora:", "is a path"),
        f"prompt: {PROMPT}\nlora: {{demo-warp: 1e9}}\n": ("job.yaml:7: lora:", "from -100 to 100"),
    }
    for body, (where, what) in cases.items():
        with pytest.raises(JobError) as e:
            plan_job(load_job(write_job(addons, body)))
        assert where in str(e.value) and what in str(e.value), str(e.value)


def test_validate_checks_the_addons_and_exits_2(addons):
    import subprocess
    import sys

    save_file(
        _kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
        addons / "loras" / "xl.safetensors",
    )
    job = write_job(addons, f"prompt: {PROMPT}\nruns:\n  - lora: none\n  - lora: [{{demo-warp: 1}}, {{xl: 0.5}}]\n")
    job.write_text(job.read_text().replace("prompt:", "defaults: {prompt: x}\n#", 1))
    for command in ("validate", "run"):
        result = subprocess.run([sys.executable, "-m", "sdbatch", command, str(job)], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert "job.yaml:10: runs[1].lora: LoRA 'xl'" in result.stderr and "SDXL" in result.stderr, result.stderr
    assert not (addons / "out").exists()


def test_an_embedding_triggers_by_tokens_not_by_letters(addons):
    """'ci' is inside 'circle' as text but not as tokens: it applies to no prompt here, enters no id
    and no TI hashes, and a broken file of that name refuses nothing (A1111's token rule)."""
    job = write_job(addons, f"steps: 2\nprompt: {PROMPT}\n")
    plain = plan_job(load_job(job)).tasks[0]
    save_file({"emb_params": torch.zeros(1, 1024)}, addons / "embeddings" / "ci.safetensors")  # SD2-wide
    (addons / "embeddings" / "rcle.pt").write_bytes(b"not an embedding")
    again = plan_job(load_job(job)).tasks[0]
    assert again.id == plain.id and not again.addons.embeddings


def test_rerun_of_an_a1111_image_refuses_an_addon_it_cannot_find(addons):
    from sdbatch.output.png import png_bytes

    infotext = (
        "a red circle\nNegative prompt: EasyNegative\nSteps: 2, Sampler: Euler a, CFG scale: 4, Seed: 3, "
        'Size: 32x32, TI hashes: "EasyNegative: 66a7279a88dd"'
    )
    image = addons / "a1111.png"
    image.write_bytes(png_bytes(Image.new("RGB", (32, 32)), {"parameters": infotext}))
    with pytest.raises(Exception, match=r"embedding 'EasyNegative' .hash 66a7279a88dd. the image was made with"):
        rerun_image(image, addons / "out", model="demo", device="cpu")


@pytest.mark.parametrize("content", [b"\xff" * 64, b"<!DOCTYPE html><html>login</html>" * 4])
def test_a_failed_download_named_like_a_lora_is_refused_in_one_line(addons, content):
    (addons / "loras" / "ff.safetensors").write_bytes(content)
    with pytest.raises(JobError, match=r"job.yaml:6: prompt: LoRA 'ff': .*ff.safetensors"):
        plan_job(load_job(write_job(addons, f"prompt: {PROMPT} <lora:ff:1>\n")))


def test_a_lora_name_that_cannot_be_written_as_a_tag_is_refused(addons):
    with pytest.raises(JobError, match="cannot hold : < > or ="):
        load_job(write_job(addons, f"prompt: {PROMPT}\nlora: {{'a:b': 1}}\n"))


def test_a_failed_merge_leaves_the_plain_model_and_is_not_taken_for_merged(monkeypatch):
    a = (("demo-warp", 0.8, 0.8),)
    library = Library(Folders.of(LORA.parent))
    pipe = Pipeline.from_file("demo")
    original = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    uses = library.addons(a, PROMPT, "").loras
    real = merge.Merger._merge
    monkeypatch.setattr(merge.Merger, "_merge", lambda self, loras: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        pipe.use_loras(uses)
    assert all(torch.equal(v, original[k]) for k, v in pipe.model.state_dict().items())
    monkeypatch.setattr(merge.Merger, "_merge", real)
    pipe.use_loras(uses)  # must merge now, not believe it merged already
    assert not all(torch.equal(v, original[k]) for k, v in pipe.model.state_dict().items())


def test_appended_bytes_and_nan_embeddings_are_refused_at_validate_time(addons):
    (addons / "loras" / "tail.safetensors").write_bytes(LORA.read_bytes() + b"\0" * 8)
    with pytest.raises(JobError, match=r"job.yaml:6: prompt: LoRA 'tail': .*8 bytes after its last tensor"):
        plan_job(load_job(write_job(addons, f"prompt: {PROMPT} <lora:tail:1>\n")))
    save_file({"emb_params": torch.full((1, 128), float("nan"))}, addons / "embeddings" / "nanny.safetensors")
    with pytest.raises(JobError, match=r"job.yaml:6: prompt: embedding 'nanny'.*NaN"):
        plan_job(load_job(write_job(addons, "prompt: a nanny circle\n")))


def test_a_lora_is_read_whole_so_a_file_rewritten_during_the_run_changes_nothing(tmp_path):
    lora = tmp_path / "demo-warp.safetensors"
    lora.write_bytes(LORA.read_bytes())
    library = Library(Folders.of(tmp_path))
    recipe = Recipe(prompt=PROMPT, size=(32, 32), steps=2, lora=(("demo-warp", 0.5, 0.5),))
    uses = library.addons(recipe.loras(), PROMPT, "").loras
    pipe = Pipeline.from_file("demo")
    pipe.use_loras(uses)
    merged = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    data = bytearray(lora.read_bytes())
    data[-64:] = b"\x11" * 64  # rewritten in place, same size
    lora.write_bytes(bytes(data))
    pipe.use_loras(())
    pipe.use_loras(uses)  # the same set again: merged from what was read and hashed, not from the new bytes
    assert all(torch.equal(v, merged[k]) for k, v in pipe.model.state_dict().items())
