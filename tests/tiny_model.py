"""A tiny random Llama over the default tokenizer, so tests exercise real chat templates in milliseconds."""

from __future__ import annotations

import functools

import torch

from engine.engines.models import LoadedModel, loaded_model_from
from engine.engines.tokenizer import load_tokenizer

TINY_FINGERPRINT = "tiny-llama@sha256:" + "0" * 64


def tiny_lm(seed: int = 0, fingerprint: str = TINY_FINGERPRINT) -> LoadedModel:
    """A fresh 2-layer Llama (hidden 64, 4 heads, 2 KV heads) wrapped as a LoadedModel, fp32 on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.2,  # large enough that the context visibly changes the next-token distribution
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Unit-scale embeddings, as in trained models (the default init makes the residual stream tiny).
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return loaded_model_from(model, tokenizer, spec="tiny-llama", fingerprint=fingerprint)


@functools.lru_cache(maxsize=1)
def shared_tiny_lm() -> LoadedModel:
    """One tiny model shared by read-only tests."""
    return tiny_lm()
