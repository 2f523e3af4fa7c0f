"""Data the workbench ships or builds: corpora, task prompt sets, reference models.

A leaf package: it imports torch, tokenizers and transformers, never the
workbench. The bundled models live under `data/models/<name>/` in HuggingFace
format and are loaded through the same `workbench.load_model` path as hub models.
"""

import os
import socket
import threading
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"

# name -> one-line description; each is a directory under MODELS_DIR built by `python -m workbench zoo build`.
BUNDLED_MODELS = {
    "ref-gpt2": "reference GPT-2 trained by data/zoo.py on Python's own sources and docs plus synthetic tasks",
    "planted-induction": "2-layer GPT-2 with a hand-built induction circuit (data/planted.py; ground_truth.json beside it)",
    "planted-induction-mlp": "3-layer GPT-2 whose hand-built induction circuit runs through an MLP relay (data/planted.py)",
}


def bundled_model_dir(name: str) -> Path:
    """Directory of a bundled model (it may not be built yet: callers check)."""
    if name not in BUNDLED_MODELS:
        raise KeyError(name)
    return MODELS_DIR / name


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the Hugging Face hub opens within `timeout` seconds (DNS included).

    False at once when HF_HUB_OFFLINE is set. Model and dataset loading ask this
    before anything that would retry for minutes on a machine with no network.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host, _, port = endpoint.split("://", 1)[-1].split("/", 1)[0].partition(":")
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, int(port or 443)), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
