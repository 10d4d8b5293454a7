"""The command line: exit codes and messages a script can rely on."""

import shutil
import subprocess
import sys

import pytest

from sdbatch import __version__
from sdbatch.checkpoints import model_hash, save_checkpoint


def sdbatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdbatch", *args], capture_output=True, text=True, timeout=120)


def test_console_script_is_installed():
    exe = shutil.which("sdbatch")
    assert exe is not None, "pip install -e . should put an `sdbatch` script on PATH"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"sdbatch {__version__}"


def test_help_lists_commands():
    result = sdbatch("--help")
    assert result.returncode == 0
    assert "check-model" in result.stdout


def test_check_model_describes_a_good_file(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    result = sdbatch("check-model", str(path))
    assert result.returncode == 0, result.stderr
    assert f"an SD 1.x checkpoint ({len(tiny.state_dict())} tensors)" in result.stdout
    assert "config       tiny" in result.stdout
    assert f"model hash   {model_hash(path)}" in result.stdout
    assert "tokenizer    bundled CLIP vocabulary" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty (0 bytes)"),
        (b"hello", "not a weights file (a text file starting with 'hello')"),
    ],
)
def test_check_model_bad_file_exits_2_without_traceback(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    result = sdbatch("check-model", str(path))
    assert result.returncode == 2
    assert f"error: {path}: {message}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_check_model_wrong_config_exits_2(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "m.safetensors")
    result = sdbatch("check-model", str(path), "--config", "sd15-inpainting", "--no-hash")
    assert result.returncode == 2
    assert "does not fit model config 'sd15-inpainting'" in result.stderr
    result = sdbatch("check-model", str(path), "--config", "sd9")
    assert result.returncode == 2
    assert "unknown model config 'sd9'" in result.stderr
