"""One self-study conversation, written once over any inference engine (`engine.engines.base`) as the
teacher: llama.cpp in its worker process (`llamacpp_backend`) or an inference server (`server_backend`).
The torch backend decodes many conversations as one padded batch, which one-at-a-time generation cannot
match on a GPU, so it keeps its own loop (`torch_backend`) with the same prompts and filters.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from engine.engines.base import InferenceEngine
from engine.engines.decoding import LoopGuard
from engine.engines.models import chat_ids
from engine.selfstudy.conversations import Conversation
from engine.selfstudy.prompts import (
    chunk_sources,
    chunk_system_prompt,
    clean_user_message,
    draw_seed,
    fill_seed,
    is_bad_user_message,
    is_direct,
    kept_answer_length,
    salvage_truncated,
)


def self_study_conversation(teacher: InferenceEngine, tokenizer, chunk, seeds: dict[str, list[str]], *,
                            rng: random.Random, sampler: np.random.Generator, stop: set[int], k: int = 20,
                            temperature: float = 0.6, max_user_tokens: int = 96,
                            max_answer_tokens: int = 192) -> Conversation | None:
    """One conversation for one chunk, or None when both user-turn attempts fail the filter. The teacher
    holds no prefix (it sees the chunk in its prompt); `rng` draws the seeds, `sampler` the sampled tokens.

    The user turn is a filled seed template, or a message the teacher writes from a seed prompt (sampled;
    cleaned and filtered, one retry); the answer is the teacher's greedy answer with its top-k rows, cut
    where it starts looping, keeping the final stop token (the cartridge must also learn when to stop).
    """
    system = {"role": "system", "content": chunk_system_prompt(chunk)}
    user, seed_type, seed_text = "", "", ""
    for _attempt in range(2):
        seed_type, seed_text = draw_seed(seeds, rng, avoid=seed_text)
        if is_direct(seed_text):
            user = fill_seed(seed_text, chunk, rng) or ""
            if user:
                break
            continue
        prompt = chat_ids(tokenizer, [system, {"role": "user", "content": seed_text}], add_generation_prompt=True)
        turn = teacher.generate(prompt, max_user_tokens, temperature=temperature, stop_ids=stop, rng=sampler)
        message, finished = clean_user_message(tokenizer.decode(turn.tokens, skip_special_tokens=True)), turn.stopped
        if not finished and (cut := salvage_truncated(message)) is not None:
            message, finished = clean_user_message(cut), True  # the question a long message started with
        if not is_bad_user_message(message, seed_text, finished):
            user = message
            break
    if not user:
        return None

    prompt = chat_ids(tokenizer, [system, {"role": "user", "content": user}], add_generation_prompt=True)
    # The answer ends where it starts looping (what follows is cut anyway). A guard, not per-token
    # callbacks: an engine in a worker process follows it there.
    answer = teacher.generate(prompt, max_answer_tokens, temperature=0.0, k=k, stop_ids=stop, rng=sampler,
                              guard=LoopGuard())
    answer_ids = list(answer.tokens)
    keep = kept_answer_length(answer_ids)
    if keep is None or answer.topk_ids is None:
        return None
    if keep < len(answer_ids):
        answer_ids = answer_ids[:keep]  # cut where it started looping
    elif answer.stopped:  # the stop token closes the answer; its row is the teacher's last
        answer_ids.append(int(answer.topk_ids[len(answer_ids)][0]))
    if not answer_ids:
        return None
    n = len(answer_ids)
    files, hashes = chunk_sources(chunk)
    return Conversation(user=user, answer_ids=np.asarray(answer_ids, np.int32),
                        topk_ids=np.asarray(answer.topk_ids[:n], np.int32),
                        topk_logprobs=np.asarray(answer.topk_logprobs[:n], np.float16),
                        files=files, file_hashes=hashes, seed_type=seed_type, slot=getattr(chunk, "slot", None))


def first_made(attempts: Iterable[Conversation | None], n: int,
               on_progress: Callable[[int, int], None] | None = None) -> Iterator[Conversation]:
    """The first `n` conversations of `attempts` (None: a chunk that gave none), each counted to
    `on_progress`. `attempts` is pulled lazily: no chunk is tried once `n` are made."""
    produced = 0
    if n <= 0:
        return
    for conversation in attempts:
        if conversation is None:
            continue
        yield conversation
        produced += 1
        if on_progress is not None:
            on_progress(produced, n)
        if produced >= n:
            return
