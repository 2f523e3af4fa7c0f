"""Shared fixtures: a tiny tokenizer, tiny model directories of each architecture, a fresh workspace.

Tiers: plain tests use tiny random models (milliseconds); tests marked `reference`
use the bundled reference model where behaviour matters; `slow` marks the few that
take more than ~20 s.
"""

from __future__ import annotations

import os

# One OpenMP thread per process (unless the caller chose otherwise): the suite's models are tiny, and many tests
# run helper processes (Streamlit servers, torchrun workers, CLI subprocesses) beside pytest; on a 2-core machine
# two spinning OpenMP threads per process oversubscribe the cores and made live-server tests miss their timeouts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal  # noqa: E402

# A shell that starts pytest in the background (`cmd &`) leaves SIGINT ignored, and exec'd children inherit an
# ignored signal, so the tests that press Ctrl-C on a cache job or the app server would see it ignored. Catching
# it here makes children start with the default disposition again (Python then turns it into KeyboardInterrupt).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

from tests.tiny import ARCHITECTURES, build_tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """{architecture: directory} of tiny random models, built once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch, tokenizer) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_model(model_dirs):
    """The tiny GPT-2 booted through load_model (shared: tests must not leave hooks behind)."""
    from workbench.model import load_model

    return load_model(model_dirs["gpt2"], device="cpu")


@pytest.fixture(scope="module")
def ref_model():
    """The bundled reference model booted through load_model, once per module (tests must not leave hooks behind)."""
    from data import bundled_model_dir
    from workbench.model import load_model

    if not (bundled_model_dir("ref-gpt2") / "config.json").is_file():
        pytest.skip("ref-gpt2 is not built (python -m workbench zoo build)")
    return load_model("ref-gpt2", device="cpu")


@pytest.fixture
def workspace(tmp_path):
    from workbench.workspace import Workspace

    return Workspace(tmp_path / "ws")
