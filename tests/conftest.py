import os

import pytest
import torch

from sdbatch.models import StableDiffusion, build_model


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads the user's caches or weights, and none can reach the network."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SDBATCH_CACHE", str(cache / "sdbatch"))
    monkeypatch.setenv("SDBATCH_WEIGHTS", str(cache / "no-weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants  # reads its env at import: point the already-imported module too

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hf"))
    torch.manual_seed(0)


def make_tiny(config: str = "tiny", seed: int = 0) -> StableDiffusion:
    from helpers import shake_norms

    torch.manual_seed(seed)
    model = build_model(config).eval().requires_grad_(False)
    shake_norms(model, seed)
    return model


@pytest.fixture
def tiny() -> StableDiffusion:
    return make_tiny()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Figures tests measure (adherence rates, tolerances), printed at the end of every run so that the
# numbers behind a pass are visible, not only the pass.
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("measured")
        for line in REPORT:
            terminalreporter.write_line(line)
