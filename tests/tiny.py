"""Tiny, randomly initialised, offline models for tests: every architecture the workbench promises to load.

Each is a real HuggingFace-format directory (config.json + model.safetensors +
tokenizer.json) booted through `workbench.load_model`, the same path as hub models.
The tokenizer is trained on task text so the task suite tokenizes as it should.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from data.tasks import examples
from data.tokenizer import train_tokenizer
from data.words import DOC_ARGS, NAMES

ARCHITECTURES = ("gpt2", "neox", "llama", "qwen2", "gemma2")


def tiny_tokenizer():
    rng = random.Random(0)
    required = [" " + n for n in NAMES] + [f"{i:02d}" for i in range(100)] + [" " + a for a in DOC_ARGS]
    texts = [" ".join(rng.choice(required) for _ in range(50)) for _ in range(400)]
    texts += [" ".join(f"{rng.randrange(11, 20)}{rng.randrange(100):02d}" for _ in range(50)) for _ in range(100)]
    for task in ("ioi", "greater_than", "docstring"):
        for split in ("train", "heldout"):
            texts += [e.clean for e in examples(task, 200, split, seed=1)]
    return train_tokenizer(texts, 2000, required)


def build_tiny_model(arch: str, directory: Path, tokenizer, seed: int = 0, d_model: int = 32, n_layers: int = 2) -> Path:
    """Save a random `arch` model with `tokenizer` to `directory` and return it."""
    from transformers import (GPT2Config, GPT2LMHeadModel, Gemma2Config, Gemma2ForCausalLM, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    heads, mlp, ctx = 4, 4 * d_model, 128
    configs = {
        "gpt2": (GPT2Config(n_positions=ctx, n_embd=d_model, n_layer=n_layers, n_head=heads, **common), GPT2LMHeadModel),
        "neox": (GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=heads, intermediate_size=mlp,
                               max_position_embeddings=ctx, **common), GPTNeoXForCausalLM),
        "llama": (LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                              intermediate_size=mlp, max_position_embeddings=ctx, **common), LlamaForCausalLM),
        "qwen2": (Qwen2Config(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                              intermediate_size=mlp, max_position_embeddings=ctx, **common), Qwen2ForCausalLM),
        "gemma2": (Gemma2Config(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                                head_dim=d_model // heads, intermediate_size=mlp, max_position_embeddings=ctx, **common), Gemma2ForCausalLM),
    }
    config, cls = configs[arch]
    torch.manual_seed(seed)
    model = cls(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
