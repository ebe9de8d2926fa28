"""A cartridge initialised from the folder in context: the model reads the whole corpus once (as the
in-context baseline would), and every layer's key/value head keeps the p positions that the corpus's own
tokens attended to most. The kept keys are re-rotated to positions 0..p-1, where a cartridge sits.

Where `spread` keeps p contiguous tokens of excerpts for every head, this keeps, per head, the tokens that
head relies on across the whole corpus. Measured as untrained cartridges on the sample at p=576: 47% of
in-context learning's answer-NLL gain against 39% for spread excerpts; on semantic_version's README at
p=256: 53% against 32%.

A corpus longer than the model's context is read in equal windows that each fit, and each window gives its
share of the p positions (`windowed_attention_selected`): every part of the folder is represented from the
start (up to MAX_WINDOWS windows, evenly spaced beyond that), where spread excerpts give each part a few
contiguous tokens.
"""

from __future__ import annotations

import sys
import threading

import torch

from engine.engines.models import LoadedModel, chat_ids, context_system_prompt

# Attention scores are computed for this many queries at a time, so that no layer's T x T matrix is held.
QUERY_CHUNK = 512
# A window of a corpus beyond the context leaves this many of the context's positions to the teacher's prompt.
WINDOW_MARGIN = 256
# At most this many windows are read (evenly spaced through a longer corpus): each still gives p/16 positions
# or more, and the reading stays bounded (a window took 22-28 s on a 2-core CPU; a 2M-token folder would
# otherwise be read in about 250).
MAX_WINDOWS = 16


def corpus_ids(lm: LoadedModel, corpus_text: str) -> list[int]:
    """The corpus as the in-context baseline sees it: the teacher's system prompt in the chat template."""
    return chat_ids(lm.tokenizer, [{"role": "system", "content": context_system_prompt(corpus_text)}],
                    add_generation_prompt=False)


def fits(lm: LoadedModel, n_tokens: int) -> bool:
    return n_tokens <= lm.max_positions


def received_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """The causal attention each position receives, summed over the queries ([heads, T]), for one sequence's
    rotated `query` [heads, T, D] and `key` [kv_heads, T, D]; `QUERY_CHUNK` queries at a time, each chunk
    against only the keys it can see, so that no T x T matrix is ever held."""
    heads, n, _ = query.shape
    key = key.float().repeat_interleave(heads // key.shape[0], dim=0)  # query head h reads KV head h // groups
    received = torch.zeros(heads, n, device=query.device)
    for start in range(0, n, QUERY_CHUNK):
        end = min(n, start + QUERY_CHUNK)
        logits = query[:, start:end].float() @ key[:, :end].transpose(1, 2) * scaling  # [heads, chunk, end]
        # key j comes after query start + i: masked
        future = torch.ones(end - start, end, dtype=torch.bool, device=query.device).triu(start + 1)
        received[:, :end] += logits.masked_fill_(future, float("-inf")).softmax(-1).sum(1)
    return received


@torch.no_grad()
def attention_scores(lm: LoadedModel, ids: list[int]) -> tuple[list[torch.Tensor], object]:
    """Per layer, the attention each position receives from all later positions, summed over the query
    heads of each KV head ([kv_heads, T]), and the KV cache of the same forward.

    The forward runs with the model's own attention; a hook before each attention layer recomputes that
    layer's rotated queries and keys from its input and scores them (`received_attention`). Both run under
    the model's autocast, as `prefix_embeddings` does: with bf16 matmuls on a 2-core CPU the sample's start
    took 22 s instead of 42 in fp32, and scored its questions alike (answer NLL 1.663 against 1.664)."""
    model = lm.model
    layers = model.model.layers
    groups = model.config.num_attention_heads // lm.n_kv_heads
    scores: list[torch.Tensor | None] = [None] * len(layers)
    owner = threading.get_ident()

    def keep_scores(index):
        def hook(module, args, kwargs):
            if threading.get_ident() != owner:  # another thread's forward on the shared model (a chat)
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            query = module.q_proj(hidden).view(shape).transpose(1, 2)
            key = module.k_proj(hidden).view(shape).transpose(1, 2)
            query, key = sys.modules[type(module).__module__].apply_rotary_pos_emb(query, key, cos, sin)
            received = received_attention(query[0], key[0], module.scaling)
            scores[index] = received.view(lm.n_kv_heads, groups, -1).sum(1)
            return None
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(keep_scores(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        with lm.autocast():
            out = model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return scores, out.cache


def rerotate(keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys rotated (RoPE) at positions `old`, turned to positions `new`: one more rotation by new - old."""
    angle = (new - old).float()[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], -1)
    cos, sin = angle.cos(), angle.sin()
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], -1)
    return keys * cos + rotated_half * sin


def _kept(lm: LoadedModel, ids: list[int], k: int, first: int, skip: int) -> torch.Tensor:
    """[layers, 2, kv_heads, k, head_dim]: per KV head the k positions of `ids` that its tokens attend to most,
    keys re-rotated to positions first..first+k-1. Position 0 (the attention sink) is always kept when
    `first` is 0; the first `skip` positions are never kept."""
    scores, cache = attention_scores(lm, ids)
    inv_freq = lm.model.model.rotary_emb.inv_freq.float().cpu()
    packed = torch.zeros(lm.n_layers, 2, lm.n_kv_heads, k, lm.head_dim)
    new = torch.arange(first, first + k)
    for layer in range(lm.n_layers):
        keys, values = cache.layers[layer].keys[0].float().cpu(), cache.layers[layer].values[0].float().cpu()
        for head in range(lm.n_kv_heads):
            received = scores[layer][head].cpu().clone()
            received[:skip] = float("-inf")
            if first == 0:
                received[0] = float("inf")
            kept = torch.topk(received, k).indices.sort().values
            packed[layer, 0, head] = rerotate(keys[head, kept], kept, new, inv_freq)
            packed[layer, 1, head] = values[head, kept]
    return packed


def _as_cartridge(packed: torch.Tensor) -> torch.Tensor:
    return packed.permute(3, 0, 1, 2, 4).reshape(packed.shape[3], -1)


@torch.no_grad()
def attention_selected(lm: LoadedModel, sampler, p: int) -> torch.Tensor | None:
    """Cartridge embeddings ([p, layers*2*heads*head_dim]) of the p most attended corpus positions per
    KV head, the first (the attention sink) always among them; the corpus is read whole, or in windows when
    longer than the model's context (`windowed_attention_selected`). None when it is shorter than p."""
    ids = corpus_ids(lm, sampler.text)
    if not fits(lm, len(ids)):
        return windowed_attention_selected(lm, sampler, p)
    if len(ids) < p:
        return None
    return _as_cartridge(_kept(lm, ids, p, 0, 0))


def template_prefix(lm: LoadedModel) -> int:
    """How many tokens the teacher's prompt has before the corpus text."""
    a, b = corpus_ids(lm, "a"), corpus_ids(lm, "b")
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def windows(n_tokens: int, size: int) -> list[tuple[int, int]]:
    """[start, end) token ranges that cut n_tokens into as few equal windows of at most `size` as will do."""
    count = -(-n_tokens // size)
    bounds = [round(i * n_tokens / count) for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def read_windows(n_tokens: int, size: int, most: int = MAX_WINDOWS) -> list[tuple[int, int]]:
    """The windows that are read: all of `windows`, or `most` of them evenly spaced, first and last included."""
    ranges = windows(n_tokens, size)
    if len(ranges) <= most:
        return ranges
    return [ranges[round(i * (len(ranges) - 1) / (most - 1))] for i in range(most)]


@torch.no_grad()
def windowed_attention_selected(lm: LoadedModel, sampler, p: int, most: int = MAX_WINDOWS) -> torch.Tensor:
    """For a corpus too long to read whole: the model reads it in equal windows that fit its context (at most
    `most` of them, see `read_windows`), each in the teacher's prompt, and each window gives an equal share of
    the p positions: those its own tokens attended to most, per KV head, in reading order. The first window
    keeps the attention sink; the others never keep their copy of the prompt's opening."""
    ranges = read_windows(sampler.n_tokens, lm.max_positions - WINDOW_MARGIN, most)
    bounds = [round(i * p / len(ranges)) for i in range(len(ranges) + 1)]  # equal windows, equal shares
    skip = template_prefix(lm)
    parts = []
    for index, (lo, hi) in enumerate(ranges):
        k = bounds[index + 1] - bounds[index]
        ids = corpus_ids(lm, sampler.span(lo, hi - lo).text)[:lm.max_positions]
        parts.append(_kept(lm, ids, k, bounds[index], 0 if index == 0 else skip))
    return _as_cartridge(torch.cat(parts, dim=3))
