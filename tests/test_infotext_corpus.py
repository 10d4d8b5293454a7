"""Real A1111 infotexts (tests/data/infotexts, sources in its SOURCES.md) through our parser.

Every file: a prompt, a negative (possibly empty), the core pairs wherever the text has them, and a
lossless round trip through format_infotext. Hand-picked files pin single values: a quoted value
with commas is one pair, a multi-line prompt keeps its line breaks, and so on.

The reference is A1111's own reader, `parse_generation_parameters` in modules/infotext_utils.py:
prompt lines, `Negative prompt:` lines, and a last line of pairs matched by `re_param`, quoted
values JSON-unquoted. Where a web UI with a common extension reads a file correctly and we do not
(Dynamic Prompts' `Template:` lines), the test says what the right answer is.
"""

import re
from pathlib import Path

import pytest

from sdbatch.output.a1111 import format_infotext, parse_infotext

CORPUS = Path(__file__).parent / "data" / "infotexts"
FILES = sorted(CORPUS.glob("*.txt"))
CORE = ("Steps", "Sampler", "CFG scale", "Seed", "Size")

# Files whose key-value line A1111's parse_generation_parameters cannot find either: an extension
# wrote a quoted value with raw line breaks, so the pairs do not end the text. Nothing here says
# what a reader should return for them beyond the prompt.
A1111_CANNOT = {
    "021-aigodlike-wildcard-prompt-raw-newlines.txt": '`Wildcard prompt: "...` spans 7 lines',
}


def read(name: str) -> str:
    with open(CORPUS / name, encoding="utf-8", newline="") as f:
        return f.read()


def parsed(name: str) -> tuple[str, str, dict[str, str]]:
    return parse_infotext(read(name))


def test_the_corpus_is_large_and_every_file_has_a_source():
    assert len(FILES) >= 30
    sources = (CORPUS / "SOURCES.md").read_text(encoding="utf-8")
    for path in FILES:
        assert f"| {path.name} |" in sources, f"{path.name} has no row in SOURCES.md"
    assert set(A1111_CANNOT) <= {path.name for path in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_prompt_negative_and_core_pairs(path):
    text = read(path.name)
    prompt, negative, pairs = parse_infotext(text)
    assert isinstance(prompt, str) and prompt
    assert isinstance(negative, str)
    has_negative_line = re.search(r"^Negative prompt:", text, re.MULTILINE) is not None
    assert bool(negative) == has_negative_line
    if path.name in A1111_CANNOT:
        return
    for key in CORE:
        if re.search(rf"(?:^|, ){re.escape(key)}: ", text, re.MULTILINE):
            assert key in pairs, f"{key!r} is in the text but not among the pairs {list(pairs)}"
    assert not re.search(r"^Steps: ", negative, re.MULTILINE), "the key-value line ended up in the negative"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_round_trip_through_format_infotext(path):
    prompt, negative, pairs = parse_infotext(read(path.name))
    written = format_infotext(prompt, negative, pairs)
    again = parse_infotext(written)
    assert again[:2] == (prompt, negative)
    assert list(again[2].items()) == list(pairs.items())  # same pairs, same order
    assert format_infotext(*again) == written


# --- values pinned per file -------------------------------------------------------------------


def test_pre_1_0_infotext_has_8_hex_model_hash_and_no_version():
    _, _, pairs = parsed("001-a1111-docstring-pre-1.0.txt")
    assert pairs == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }


def test_first_pass_size_era():
    _, _, pairs = parsed("002-bpmodel-sunset-first-pass-size.txt")
    assert pairs["Model hash"] == "855959a4"
    assert pairs["First pass size"] == "0x0"
    assert pairs["ENSD"] == "31337" and pairs["Clip skip"] == "2"
    assert "Model" not in pairs and "Version" not in pairs


def test_escaped_parentheses_and_prompt_editing_stay_in_the_prompt():
    prompt, _, pairs = parsed("003-bpmodel-orange-ddim-batch-escaped-parens.txt")
    assert r"orange \(fruit\)" in prompt
    assert (pairs["Sampler"], pairs["Batch size"], pairs["Batch pos"]) == ("DDIM", "4", "1")
    prompt, _, _ = parsed("006-bpmodel-nested-prompt-editing.txt")
    assert prompt.startswith(r"by [shion (fkey:0.9):momoko \(momopoco\):0.15], fang")
    prompt, _, _ = parsed("004-bpmodel-icecream-prompt-editing-alternation.txt")
    assert prompt.startswith("[sketch:0.75] [(oil painting:0.5)::0.75] by")
    assert "[black|blue]" in prompt


def test_float_cfg_scale_is_kept_as_written():
    _, _, pairs = parsed("005-bpmodel-girl-euler-float-cfg.txt")
    assert (pairs["Sampler"], pairs["CFG scale"]) == ("Euler", "8.5")


def test_variation_seed_and_an_empty_line_ending_the_prompt():
    prompt, negative, pairs = parsed("008-orangemixs-variation-seed-blank-line.txt")
    # A1111 keeps the empty prompt line: the prompt ends with a line break
    assert prompt.count("\n") == 3 and prompt.endswith("(extremely detailed CG:1.2),\n")
    assert negative.startswith("(bad_prompt_version2:1), distant view")
    assert pairs["Variation seed"] == "93902374"
    assert pairs["Variation seed strength"] == "0.45"
    assert (pairs["Model hash"], pairs["Model"]) == ("cc44dbff", "AbyssOrangeMix")


def test_hires_fix_fields():
    _, _, pairs = parsed("009-deadman44-el-zipang-multiline-unipc.txt")
    assert (pairs["Sampler"], pairs["Hires upscale"], pairs["Hires upscaler"]) == ("UniPC", "2", "SwinIR_4x")
    assert pairs["Denoising strength"] == "0.18" and "Model" not in pairs
    _, _, pairs = parsed("018-aigodlike-adetailer-break-version-rc.txt")
    assert (pairs["Hires upscale"], pairs["Hires steps"], pairs["Hires upscaler"]) == ("2", "4", "ESRGAN_4x")
    _, _, pairs = parsed("012-ekmix-hires-resize-eta.txt")
    assert (pairs["Hires resize"], pairs["Hires steps"], pairs["Eta"]) == ("856x1280", "30", "0.5")


def test_unquoted_lora_hashes_of_v1_3_keep_their_colon():
    prompt, _, pairs = parsed("011-deadman44-jpface-unquoted-lora-hashes-token-merging.txt")
    assert prompt.endswith("white ribbed sweater, brown eyes <lora:jpface:1>")
    assert pairs["Lora hashes"] == "jpface: bc0b0c346d61"
    assert pairs["Token merging ratio"] == "0.5" and pairs["Token merging ratio hr"] == "0.5"
    assert (pairs["Sampler"], pairs["Version"]) == ("DPM++ 2M SDE Karras", "v1.3.0")


def test_multi_line_prompts_keep_their_line_breaks():
    prompt, negative, _ = parsed("013-hydrus-break-multiline.txt")
    assert prompt == "masterpiece\nBREAK\n1girl\nBREAK\n((outdoors)), egyptian,"
    assert negative == "lowres"
    prompt, _, pairs = parsed("014-hydrus-and-multiline.txt")
    assert prompt == "masterpiece, 1girl\nAND\n(best quality), white background"
    assert pairs["Model"] == "AOM2-nutmegmixGav2+ElysV3" and pairs["ENSD"] == "31334"
    prompt, _, _ = parsed("017-hydrus-extra-networks-leading-space.txt")
    # A1111 strips every line, so the third line loses its leading space
    assert prompt == (
        "(colorful:1.3),\ndreamlike fantasy landscape where everything is a shade of pink,\n"
        "<lora:NAI-cutesexyrobutts:1>"
    )
    prompt, _, _ = parsed("025-furkan-adetailer-lora-blank-line.txt")
    assert prompt == (
        "photo ohwx man dressage riding a saber-toothed tiger , sunny day, 35mm photograph,film,"
        "professional,4k,highly detailed\n\n<lora:12gb_settings-000007:1>"
    )


def test_multi_line_negative_prompt():
    prompt, negative, pairs = parsed("028-ivy-variation-seed-resize-multiline-negative.txt")
    assert prompt == "masterpiece, best quality,\ngirl"
    assert negative == "lowres, bad anatomy, bad hands\nman"
    assert (pairs["Variation seed"], pairs["Variation seed strength"]) == ("123", "0.17")
    assert pairs["Seed resize from"] == "320x384"
    assert (pairs["Model hash"], pairs["Model"]) == ("81761151", "sdv1-5-pruned-emaonly")


def test_quoted_x_values_with_commas_are_one_pair():
    _, _, pairs = parsed("016-hydrus-xyz-plot-quoted-x-values.txt")
    assert pairs["X Values"] == (
        "<lora:cru5rb:0.5> , <lora:cru5rb:0.6>,<lora:cru5rb:0.7>,  "
        "<lora:cru5rb:0.8> ,<lora:cru5rb:0.9> , <lora:cru5rb:1>,"
    )
    assert (pairs["Script"], pairs["X Type"]) == ("X/Y/Z plot", "Prompt S/R")
    assert pairs["Hires upscaler"] == "Latent (nearest-exact)"
    assert list(pairs)[-1] == "X Values"


def test_adetailer_quoted_prompt_keeps_its_trailing_space():
    _, negative, pairs = parsed("018-aigodlike-adetailer-break-version-rc.txt")
    assert negative.endswith("watermark,username,blurry,")
    assert pairs["ADetailer prompt"] == "black eyes, black hair, "
    assert pairs["ADetailer model"] == "face_yolov8n.pt"
    assert pairs["ADetailer dilate erode"] == "4"
    assert (pairs["Downcast alphas_cumprod"], pairs["Version"]) == ("True", "1.8.0-RC")
    _, _, pairs = parsed("025-furkan-adetailer-lora-blank-line.txt")
    assert pairs["ADetailer prompt"] == "face photo of ohwx man <lora:12gb_settings-000007:1>"
    assert pairs["ADetailer dilate/erode"] == "4"
    assert pairs["Lora hashes"] == "12gb_settings-000007: f9b455fdd697"


def test_controlnet_unit_with_commas_and_colons_is_one_pair():
    _, _, pairs = parsed("019-aigodlike-controlnet-unipc-schedule-type.txt")
    assert pairs["ControlNet 0"] == (
        "Module: tile_resample, Model: control_v11f1e_sd15_tile_fp16 [3b860298], Weight: 0.6, "
        "Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 1.0, Threshold B: 0.5, "
        "Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: True, Control Mode: Balanced"
    )
    assert (pairs["Sampler"], pairs["Schedule type"]) == ("UniPC", "Karras")
    assert pairs["TI hashes"] == "ng_deepnegative_v1_75t: 54e7e4826d53"
    assert (pairs["Pad conds"], pairs["Version"]) == ("True", "v1.9.4")
    assert "Module" not in pairs and "Weight" not in pairs  # nothing leaks out of the quotes
    _, negative, pairs = parsed("023-facetoanimals-controlnet-no-negative.txt")
    assert negative == ""
    assert pairs["ControlNet 0"].startswith("Module: mediapipe_face, Model: None, Weight: 1.25,")
    assert pairs["ControlNet 0"].endswith("Control Mode: ControlNet is more important")
    assert (pairs["Model"], pairs["Version"]) == ("v1-5-pruned-emaonly", "v1.5.2")


def test_non_latin_model_name():
    _, _, pairs = parsed("020-aigodlike-chinese-model-name-ensd.txt")
    assert pairs["Model"] == "二次元_mixProV45Colorbox_v45"
    assert pairs["Model hash"] == "19dbfda152"


def test_schedule_type_rng_emphasis_ngms_vae():
    _, _, pairs = parsed("022-diffusion-cg-ngms-rng-emphasis-hires-resize.txt")
    assert (pairs["Sampler"], pairs["Schedule type"]) == ("Euler a", "Automatic")
    assert (pairs["RNG"], pairs["Emphasis"], pairs["NGMS"]) == ("CPU", "No norm", "0.5")
    assert (pairs["VAE hash"], pairs["VAE"]) == ("235745af8d", "sdxl-vae.safetensors")
    assert (pairs["Hires resize"], pairs["eps_scaling_factor"]) == ("1344x1792", "1.02")
    assert pairs["Version"] == "classic"


def test_lora_and_ti_hashes_of_v1_10():
    prompt, negative, pairs = parsed("024-auto-messaging-lcm-lora-ti-hashes.txt")
    assert prompt == "1girl,nsfw,bare shoulders,, <lora:ip-adapter-faceid-plusv2_sd15_lora:1>, <lora:LCM_15:1>"
    assert negative == "low quality,badhandv4,bad-picture-chill-75v,"
    assert pairs["Lora hashes"] == "ip-adapter-faceid-plusv2_sd15_lora: a95a0f4bdcb9, LCM_15: aaebf6360f7d"
    assert pairs["TI hashes"] == "badhandv4: 5e40d722fc3d, bad-picture-chill-75v: 7d9cc5f549d7"
    assert (pairs["Steps"], pairs["CFG scale"], pairs["Version"]) == ("6", "1.5", "v1.10.1")


def test_hypernet_fields_and_a_colon_in_the_prompt():
    prompt, negative, pairs = parsed("030-yagamitaichi-hypernet-no-negative.txt")
    assert prompt.endswith("goggles_on_head, :d") and negative == ""
    assert pairs["Hypernet"] == "yagamitaichi-200000" and "Hypernet strength" not in pairs
    prompt, _, pairs = parsed("031-yagamitaichi-hypernet-strength-snowy-peak.txt")
    assert r"star_\(symbol\)" in prompt
    assert pairs["Hypernet strength"] == "0.7"


def test_a1111_cannot_find_the_pairs_but_the_prompt_is_still_right():
    prompt, _, _ = parsed("021-aigodlike-wildcard-prompt-raw-newlines.txt")
    assert prompt.split("\n") == [
        "masterpiece, best quality, 1girl, solo, voxel art,",
        "gazebo, white girl,",
        "rust hair, ochre eyes,",
        "long hair, folded ponytail,",
        "evening gown, trim dress,",
        "ribbon, Gift Hat Hair Band , Opera-length necklaces, Arm harnesses,",
        "classic, medieval, noble",
    ]


# --- Dynamic Prompts writes `Template:` lines AFTER the key-value line ---------------------------
# sd-dynamic-prompts (pnginfo_saver.update_pnginfo) appends "\nTemplate: ..." and
# "\nNegative Template: ..." to the infotext, so the pairs are no longer the last line. A1111's
# bare parser then puts the whole key-value line into the negative; the extension's
# on_infotext_pasted hook (callbacks.py) cuts the Template lines off and parses again, so a web UI
# with the extension installed reads these files correctly. These tests ask the same of us.


def test_dynamic_prompts_template_lines():
    prompt, negative, pairs = parsed("015-hydrus-dynamic-prompts-template-lines.txt")
    assert prompt == "1girl, pink hair"
    assert negative == "(worst quality, low quality:1.4)"
    assert (pairs.get("Steps"), pairs.get("Seed")) == ("20", "780207036")
    assert pairs.get("AddNet Model 1") == "ElysiaV3-000002(6d3eb064dcc1)"

    prompt, negative, pairs = parsed("026-furkan-dynamic-prompts-template-lines.txt")
    assert prompt.startswith("breathtaking closeshot photo of ohwx man riding a dinosaur")
    assert negative == "deformed, ugly, deformed, noisy, blurry, distorted, grainy"
    assert (pairs.get("Seed"), pairs.get("Version")) == ("4007836056", "v1.5.1")
    assert pairs.get("Lora hashes") == "24gb_settings-000007: f99b38a8f85d"


def test_dynamic_prompts_multi_line_template():
    prompt, negative, pairs = parsed("027-furkan-dynamic-prompts-multiline-template.txt")
    assert prompt.endswith("highly detailed\n\n<lora:24gb_settings-000007:1>")
    assert negative == "drawing,painting,crayon,sketch,graphite,impressionist,noisy,blurry,soft,deformed,ugly"
    assert (pairs.get("Seed"), pairs.get("Hires upscale")) == ("4114707048", "1.6")
