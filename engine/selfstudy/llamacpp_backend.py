"""Self-study synthesis on llama.cpp: the quantised GGUF writes the conversations, one sequence at a time.

Per chunk, the system prompt with the chunk is evaluated once; the user turn (sampled from a seed prompt)
and the answer turn (greedy) both continue from that KV, because the engine keeps the longest common
prefix of consecutive prompts and drops only what follows it. The teacher's top-k log-probabilities
come from the very logits that chose each greedy answer token: no second forward pass.

Same contract as the torch backend in `engine.selfstudy.torch_backend` (same system prompt, seed draw,
user-message cleaning and filter with one retry, answers that keep their final stop token with its top-k).
`engine.selfstudy.synthesis` registers `llamacpp_backend` as its "llamacpp" backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from engine.selfstudy.conversations import Conversation
from engine.errors import UserError
from engine.engines.llamacpp import LayoutUnsupported, LlamaCppEngine, topk_logprobs
from engine.engines.llamacpp_worker import LlamaCppProcess
from engine.engines.decoding import Generated, loop_start, stop_ids
from engine.selfstudy.conversation import self_study_conversation
from engine.selfstudy.prompts import slot_random
from engine.selfstudy.torch_backend import _synthesize_torch

CONTEXT_MARGIN = 320  # template, seed prompt and headers on top of the chunk and the two turns


def context_size_for(chunks: Iterable, max_user_tokens: int, max_answer_tokens: int, limit: int = 8192) -> int:
    """A llama.cpp context large enough for the longest teacher prompt (chunk, window or whole corpus)
    plus both turns (multiple of 256)."""
    longest = max((max(int(getattr(c, "n_tokens", 0) or 0), int(getattr(c, "context_tokens", 0) or 0))
                   for c in chunks), default=0) or 2048
    need = longest + max(max_user_tokens, 128) + max_answer_tokens + CONTEXT_MARGIN
    return min(limit, max(1024, -(-need // 256) * 256))


class LlamaCppTeacher:
    """llama.cpp as a self-study `Teacher`. The engine must hold no cartridge (the teacher sees the chunk, not a
    cartridge); its sequence is reused: whatever prefix the previous call left is kept as far as it matches,
    so both turns of a conversation continue from the chunk's evaluated system prompt. The top-k rows come
    from the very logits that chose each greedy token: no second pass."""

    def __init__(self, engine: LlamaCppEngine, sampler: np.random.Generator):
        self.engine = engine
        self.sampler = sampler  # the conversation's own stream for sampled user turns

    def generate(self, prompt: list[int], max_tokens: int, *, temperature: float, k: int = 0,
                 stop_ids: set[int] | None = None) -> Generated:
        if not k:
            out = self.engine.generate_stats(prompt, max_tokens, temperature, stop_ids, rng=self.sampler)
            return Generated(list(out.tokens), out.stopped)
        rows_ids: list[np.ndarray] = []
        rows_lp: list[np.ndarray] = []
        so_far: list[int] = []

        def keep_topk(logits: np.ndarray) -> None:
            ids, lp = topk_logprobs(logits, k)
            rows_ids.append(ids)
            rows_lp.append(lp)

        out = self.engine.generate_stats(prompt, max_tokens, temperature, stop_ids, rng=self.sampler,
                                         on_token=so_far.append, on_logits=keep_topk,
                                         should_stop=lambda: loop_start(so_far) is not None)
        if not rows_ids:
            return Generated(list(out.tokens), out.stopped, np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
        return Generated(list(out.tokens), out.stopped, np.stack(rows_ids), np.stack(rows_lp))


def synthesize_llamacpp(model_path: str | Path | None, tokenizer, chunks: Iterable, n: int, *,
                        seeds: dict[str, list[str]], k: int = 20, temperature: float = 0.6, max_user_tokens: int = 96,
                        max_answer_tokens: int = 192, seed: int = 0,
                        on_progress: Callable[[int, int], None] | None = None,
                        engine: LlamaCppEngine | None = None, n_ctx: int | None = None) -> Iterator[Conversation]:
    """Yield up to `n` conversations, one chunk per attempt (a chunk whose user turn fails twice is skipped).

    `model_path` is the GGUF (None: the default model); `tokenizer` is the same model's transformers
    tokenizer (prompts are built by `chat_ids`, exactly as in training). Pass `engine` to reuse a context.
    """
    if not seeds:
        raise UserError("no seed prompts")
    if n <= 0:
        return
    if engine is None:
        if not isinstance(chunks, (list, tuple)):
            chunks = list(chunks)
        size = n_ctx or context_size_for(chunks, max_user_tokens, max_answer_tokens)
        engine = LlamaCppProcess(model_path, n_ctx=size)
    engine.clear()
    stop = stop_ids(tokenizer)
    produced = 0
    for index, chunk in enumerate(chunks):
        if produced >= n:
            break
        rng, sampler = slot_random(seed, chunk, index)
        conversation = self_study_conversation(
            LlamaCppTeacher(engine, sampler), tokenizer, chunk, seeds, rng=rng, stop=stop, k=k,
            temperature=temperature, max_user_tokens=max_user_tokens, max_answer_tokens=max_answer_tokens)
        if conversation is None:
            continue
        yield conversation
        produced += 1
        if on_progress is not None:
            on_progress(produced, n)


def llamacpp_backend(lm, chunks: Iterable, n: int, *, seeds, k, temperature, max_user_tokens, max_answer_tokens,
                     batch_size, on_progress, seed) -> Iterator[Conversation]:
    """The "llamacpp" backend: the default GGUF on llama.cpp; any other model, or a
    llama.cpp whose KV layout is not the known one, goes to the torch backend."""
    torch_backend = _synthesize_torch
    kwargs = dict(seeds=seeds, k=k, temperature=temperature, max_user_tokens=max_user_tokens,
                  max_answer_tokens=max_answer_tokens, on_progress=on_progress, seed=seed)
    if getattr(lm, "spec", None) != "default":
        return torch_backend(lm, chunks, n, batch_size=batch_size, **kwargs)
    chunks = list(chunks)
    try:
        engine = LlamaCppProcess(None, n_ctx=context_size_for(chunks, max_user_tokens, max_answer_tokens))
    except LayoutUnsupported:
        return torch_backend(lm, chunks, n, batch_size=batch_size, **kwargs)
    if engine.fingerprint != lm.fingerprint:  # the torch model must be the same file the cartridge is trained on
        engine.close()
        return torch_backend(lm, chunks, n, batch_size=batch_size, **kwargs)
    return synthesize_llamacpp(engine.model_path, lm.tokenizer, chunks, n, engine=engine, **kwargs)

