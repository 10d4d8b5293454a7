"""The demo training script: a tiny budget gives a loadable model; a killed run resumes to the same weights."""

import pytest
import torch
from safetensors import safe_open

from sdbatch.checkpoints import load_model
from sdbatch.demo import train
from sdbatch.tokenizer import load_tokenizer

TINY_BUDGET = ["--vae-steps", "3", "--vae-batch", "4", "--steps", "4", "--batch", "4", "--save-every", "1", "--quiet"]


def run(tmp_path, name: str, *extra: str) -> None:
    train.main(["--out", str(tmp_path / name / "out"), "--work", str(tmp_path / name / "work"), *TINY_BUDGET, *extra])


def weights(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_tiny_training_run_writes_a_loadable_model(tmp_path):
    run(tmp_path, "a")
    path = tmp_path / "a" / "out" / "model.safetensors"
    loaded = load_model(path)  # config from the file's header: no name needed
    assert loaded.config.name == "demo"
    assert loaded.config.vae.scale_factor != 1.0  # measured on the trained VAE
    assert {p.dtype for p in weights(path).values()} == {torch.float16}  # shipped small
    tokenizer = load_tokenizer(path, vocab_size=loaded.config.clip.vocab_size)
    assert tokenizer.source == str(path.parent / "tokenizer")
    assert len(tokenizer.tokens("a red circle on a blue background")) == 7


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    run(tmp_path, "whole")
    step = train.Trainer.diffusion_step
    calls = []

    def dies_on_the_third(self):
        calls.append(self.step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(train.Trainer, "diffusion_step", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed")
    monkeypatch.setattr(train.Trainer, "diffusion_step", step)
    run(tmp_path, "killed", "--resume")
    whole = weights(tmp_path / "whole" / "out" / "model.safetensors")
    resumed = weights(tmp_path / "killed" / "out" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_resume_with_other_settings_is_refused(tmp_path):
    run(tmp_path, "a")
    with pytest.raises(SystemExit, match="was written with other settings"):
        run(tmp_path, "a", "--resume", "--lr", "0.5")
