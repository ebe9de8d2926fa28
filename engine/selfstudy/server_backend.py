"""Self-study on an inference server (`engine.engines.server`): the same conversations as the local backends
(system prompt with the chunk, seed draw, user-message cleaning and filter with one retry, greedy answers cut
where they start looping, the final stop token kept with its top-k), with several conversations in flight.

Conversations come back in chunk order whatever order the server finishes them in, so shards are written in
slot order and an interrupted run resumes after the last saved slot, as with the local backends.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np

from engine.engines.decoding import stop_ids
from engine.engines.models import chat_ids
from engine.engines.server import ServerClient
from engine.errors import UserError
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
    slot_random,
)


def server_conversation(client: ServerClient, tokenizer, chunk, seeds: dict[str, list[str]], *, rng: random.Random,
                        stop: set[int], k: int = 20, temperature: float = 0.6, max_user_tokens: int = 96,
                        max_answer_tokens: int = 192) -> Conversation | None:
    """One conversation for one chunk, or None when both user-turn attempts fail the filter."""
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
        turn = client.generate(prompt, max_user_tokens, temperature=temperature, seed=rng.randrange(2**31),
                               stop_ids=stop)
        message, finished = clean_user_message(tokenizer.decode(turn.tokens, skip_special_tokens=True)), turn.stopped
        if not finished and (cut := salvage_truncated(message)) is not None:
            message, finished = clean_user_message(cut), True
        if not is_bad_user_message(message, seed_text, finished):
            user = message
            break
    if not user:
        return None

    prompt = chat_ids(tokenizer, [system, {"role": "user", "content": user}], add_generation_prompt=True)
    answer = client.generate(prompt, max_answer_tokens, temperature=0.0, k=k, stop_ids=stop)
    answer_ids = list(answer.tokens)
    keep = kept_answer_length(answer_ids)
    if keep is None or answer.topk_ids is None:
        return None
    rows_ids, rows_lp = answer.topk_ids, answer.topk_logprobs
    if keep < len(answer_ids):
        answer_ids = answer_ids[:keep]  # cut where it started looping
    elif answer.stopped:  # the stop token closes the answer, with its own row
        answer_ids.append(int(rows_ids[len(answer_ids)][0]))
    if not answer_ids:
        return None
    n = len(answer_ids)
    files, hashes = chunk_sources(chunk)
    return Conversation(user=user, answer_ids=np.asarray(answer_ids, np.int32),
                        topk_ids=np.asarray(rows_ids[:n], np.int32),
                        topk_logprobs=np.asarray(rows_lp[:n], np.float16),
                        files=files, file_hashes=hashes, seed_type=seed_type, slot=getattr(chunk, "slot", None))


def synthesize_on_server(client: ServerClient, tokenizer, chunks: Iterable, n: int, *, seeds: dict[str, list[str]],
                         k: int = 20, temperature: float = 0.6, max_user_tokens: int = 96, max_answer_tokens: int = 192,
                         seed: int = 0, concurrency: int = 4,
                         on_progress: Callable[[int, int], None] | None = None) -> Iterator[Conversation]:
    """Yield up to `n` conversations in chunk order, `concurrency` chunks in flight at a time."""
    if not seeds:
        raise UserError("no seed prompts")
    if concurrency < 1:
        raise UserError("--concurrency must be at least 1")
    if n <= 0:
        return
    stop = stop_ids(tokenizer)

    def one(index_chunk):
        index, chunk = index_chunk
        rng, _ = slot_random(seed, chunk, index)
        return server_conversation(client, tokenizer, chunk, seeds, rng=rng, stop=stop, k=k, temperature=temperature,
                                   max_user_tokens=max_user_tokens, max_answer_tokens=max_answer_tokens)

    produced = 0
    items = enumerate(chunks)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="selfstudy-server") as pool:
        pending = deque(pool.submit(one, item) for item in islice(items, concurrency))
        try:
            while pending and produced < n:  # results in chunk order, `concurrency` chunks in flight
                conversation = pending.popleft().result()
                following = next(items, None)
                if following is not None:
                    pending.append(pool.submit(one, following))
                if conversation is None:
                    continue
                yield conversation
                produced += 1
                if on_progress is not None:
                    on_progress(produced, n)
        finally:
            for future in pending:
                future.cancel()
