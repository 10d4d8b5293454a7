"""The prompt language at the CLI (issue 13, parts 6 and 7): `plan --explain-prompt` shows how a
prompt parses; what sdbatch refuses is a file:line error at validate time, and what A1111 reads as
text (unbalanced brackets, `(x:abc)`) is not an error."""

import subprocess
import sys
import textwrap

import pytest


def sdbatch(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sdbatch", *args], cwd=cwd, capture_output=True, text=True)


def test_plan_explains_edits_weights_and_chunks(tmp_path):
    (tmp_path / "job.yaml").write_text(
        'prompt: "a (red:1.5) [circle:square:10], [blurry] BREAK night"\nsteps: 20\nclip_skip: 2\n'
    )
    result = sdbatch("plan", "job.yaml", "--explain-prompt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "switching after step 10" in out and "clip skip 2" in out
    assert '"red" x1.5' in out and '"blurry" x0.9091' in out and "BREAK" in out
    assert "until step 10: 2 chunk(s)" in out and "until step 20: 2 chunk(s)" in out
    assert "circle" in out.split("steps 1-10:")[1].split("\n")[0]
    assert "square" in out.split("steps 11-20:")[1].split("\n")[0]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a [cat:dog:50] b", "switches after step 50, but there are only 20 steps"),
        ("a [cat:dog:1.5] b", "fraction"),
        ("a cat AND a dog", "composable prompts (AND) are not supported yet"),
    ],
)
def test_prompts_sdbatch_cannot_render_as_a1111_would_are_file_line_errors(tmp_path, prompt, message):
    (tmp_path / "job.yaml").write_text(textwrap.dedent(f'name: p\nsteps: 20\nprompt: "{prompt}"\n'))
    result = sdbatch("validate", "job.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "job.yaml:3: prompt:" in result.stderr and message in result.stderr
    assert sdbatch("run", "job.yaml", cwd=tmp_path).returncode == 2
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("prompt", ["a (cat:abc) b", "a (((unclosed", "x ) ] stray", "a \\\\(literal\\\\)"])
def test_what_a1111_reads_as_text_is_not_an_error(tmp_path, prompt):
    (tmp_path / "job.yaml").write_text(f'prompt: "{prompt}"\nnegative: "x AND y"\n')
    result = sdbatch("validate", "job.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
