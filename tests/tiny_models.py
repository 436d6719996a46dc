"""Tiny random transformers models (hidden 64, 2 layers) for unit tests; built in ms."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 128
TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "gpt2",
)

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A randomly initialised causal LM of ``model_type`` in eval mode."""
    import transformers as T

    torch.manual_seed(seed)
    if model_type == "gpt2":
        config = T.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        model = T.GPT2LMHeadModel(config)
    elif model_type == "gemma3":
        config = T.Gemma3Config(
            text_config=dict(_DECODER),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14,
            ),
            mm_tokens_per_image=4,
        )  # fmt: skip
        model = T.Gemma3ForConditionalGeneration(config)
    else:
        config = T.AutoConfig.for_model(model_type, **_DECODER)
        model = T.AutoModelForCausalLM.from_config(config)
    return model.eval()
