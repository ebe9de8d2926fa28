"""Self-study on an inference server (`engine.engines.server`): the same conversations as the local backends
(system prompt with the chunk, seed draw, user-message cleaning and filter with one retry, greedy answers cut
where they start looping, the final stop token kept with its top-k), with several conversations in flight.

Conversations come back in chunk order whatever order the server finishes them in, so shards are written in
slot order and an interrupted run resumes after the last saved slot, as with the local backends.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, TimeoutError as FutureTimeout
from itertools import islice

from engine.engines.decoding import stop_ids
from engine.engines.server import ServerClient
from engine.engines.server_engine import ServerInference
from engine.errors import UserError
from engine.selfstudy.conversations import Conversation
from engine.selfstudy.conversation import first_made, self_study_conversation
from engine.selfstudy.prompts import slot_random


def synthesize_on_server(client: ServerClient, tokenizer, chunks: Iterable, n: int, *, seeds: dict[str, list[str]],
                         k: int = 20, temperature: float = 0.6, max_user_tokens: int = 96, max_answer_tokens: int = 192,
                         seed: int = 0, concurrency: int = 4, on_progress: Callable[[int, int], None] | None = None,
                         should_stop: Callable[[], bool] | None = None) -> Iterator[Conversation]:
    """Yield up to `n` conversations in chunk order, `concurrency` chunks in flight at a time. `should_stop`
    is also checked while waiting for the server, so a stop does not wait for a slow or hung request (the
    requests in flight are left to end or time out in their threads)."""
    if not seeds:
        raise UserError("no seed prompts")
    if concurrency < 1:
        raise UserError("--concurrency must be at least 1")
    if n <= 0:
        return
    stop = stop_ids(tokenizer)
    teacher = ServerInference(client)  # holds no prefix; shared by the threads (the client is thread-safe)

    def one(index_chunk):
        index, chunk = index_chunk
        rng, sampler = slot_random(seed, chunk, index)
        return self_study_conversation(teacher, tokenizer, chunk, seeds, rng=rng, sampler=sampler, stop=stop, k=k,
                                       temperature=temperature, max_user_tokens=max_user_tokens,
                                       max_answer_tokens=max_answer_tokens)

    def submit(item) -> Future:
        """`one(item)` in a daemon thread of its own. A pool's threads are joined when the interpreter exits,
        so after Ctrl-C the command would wait for the requests in flight to time out (minutes on a hung
        server); daemon threads are left behind."""
        future = Future()

        def run():
            try:
                future.set_result(one(item))
            except BaseException as error:  # handed to the thread that waits for it
                future.set_exception(error)

        threading.Thread(target=run, name="selfstudy-server", daemon=True).start()
        return future

    def result(future):
        while True:
            try:
                return future.result(timeout=0.25)
            except FutureTimeout:
                if should_stop is not None and should_stop():
                    return STOPPED

    def attempts():
        """Results in chunk order, `concurrency` chunks in flight."""
        items = enumerate(chunks)
        pending = deque(submit(item) for item in islice(items, concurrency))
        while pending:
            conversation = result(pending.popleft())
            if conversation is STOPPED:
                return
            following = next(items, None)
            if following is not None:
                pending.append(submit(following))
            yield conversation

    yield from first_made(attempts(), n, on_progress)


STOPPED = object()
