"""The one interface every inference engine implements; chat, eval and self-study are written against it.

An engine holds an optional prefix in front of every prompt: a cartridge (its KV, [p, width]) or the KV of
real tokens (the corpus as a system prompt, evaluated once). It generates after prefix + prompt, with the
top-k log-probabilities of every generated token when asked, and scores a given continuation. Prompts are
token ids built by `engine.engines.models.chat_ids`, the format cartridges are trained on.

Implementations: `torch_engine.TorchEngine` (transformers, any supported model, any device),
`llamacpp_engine.LlamaCppInference` (the bundled GGUF on llama.cpp, in its worker process) and
`server_engine.ServerInference` (an inference server; it generates only, as a self-study teacher: a server
takes no cartridge and the app does not score through one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from engine.engines.decoding import Generated


@runtime_checkable
class InferenceEngine(Protocol):
    name: str  # "torch", "llama.cpp" or "server": shown in replies and in JSON
    n_ctx: int  # positions: prefix + prompt + answer must fit

    def set_prefix(self, embeddings=None, system_ids: list[int] | None = None) -> int:
        """Put a cartridge (`embeddings`) or the KV of `system_ids` in front of every prompt (neither: nothing);
        returns the positions the prefix holds. Prompts then leave out the `system_ids` the prefix holds."""

    def generate(self, prompt: list[int], max_tokens: int, *, temperature: float = 0.0, k: int = 0,
                 stop_ids: set[int] | None = None, on_token: Callable[[int], None] | None = None, guard=None,
                 should_stop: Callable[[], bool] | None = None, rng: np.random.Generator | None = None) -> Generated:
        """Continue prefix + `prompt`: greedy at temperature 0, else sampled (from `rng`). Streams each kept token
        to `on_token`, ends when `should_stop()` says so after a token, obeys a `decoding.LoopGuard`; with `k`,
        the top-k rows of every generated token, and of the stop token when the answer ended on it."""

    def score(self, ids: list[int], first: int) -> float:
        """Mean negative log-likelihood of `ids[first:]` after prefix + `ids[:first]`."""

    def first_token_s(self, prompt: list[int]) -> float:
        """Seconds from nothing cached to the first token of an answer to `prompt`: building the prefix (once,
        in `set_prefix`) plus evaluating the prompt after it."""

    def kv_bytes(self, n_tokens: int) -> int:
        """KV-cache memory of `n_tokens` positions."""

    def close(self) -> None:
        """Free what the engine holds (a worker process, a connection)."""

