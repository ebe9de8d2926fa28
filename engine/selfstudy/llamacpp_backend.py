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


from engine.selfstudy.conversations import Conversation
from engine.errors import UserError
from engine.engines.llamacpp import LayoutUnsupported, LlamaCppEngine
from engine.engines.llamacpp_inference import LlamaCppInference
from engine.engines.llamacpp_worker import LlamaCppProcess
from engine.engines.decoding import stop_ids
from engine.selfstudy.conversation import first_made, self_study_conversation
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
    teacher = LlamaCppInference(engine)
    teacher.set_prefix()  # nothing in front: the teacher sees the chunk in its prompt
    stop = stop_ids(tokenizer)

    def attempts():
        for index, chunk in enumerate(chunks):
            rng, sampler = slot_random(seed, chunk, index)
            yield self_study_conversation(
                teacher, tokenizer, chunk, seeds, rng=rng, sampler=sampler, stop=stop, k=k,
                temperature=temperature, max_user_tokens=max_user_tokens, max_answer_tokens=max_answer_tokens)

    yield from first_made(attempts(), n, on_progress)


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

