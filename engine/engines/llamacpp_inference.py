"""The inference interface (`engine.engines.base`) on llama.cpp: the bundled GGUF, as quantised.

Wraps a `LlamaCppEngine` or, as the app runs it, a `LlamaCppProcess` (the same engine in its worker
process, so that a crash in native code does not take the app down). The prefix is written into the
context once, as the state of the sequence; every call reuses whatever prompt prefix is already evaluated.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.engines.decoding import Generated


class LlamaCppInference:
    name = "llama.cpp"

    def __init__(self, llama, *, warm_ids: list[int] | None = None):
        """`warm_ids`: tokens every prompt starts with (the chat template's head), evaluated right after a
        cartridge so that a chat's first reply pays only for its own tokens."""
        self.llama, self.warm_ids = llama, warm_ids
        self.n_ctx = int(llama.n_ctx)
        self.prefix_positions = 0
        self.prefix_s = 0.0

    def set_prefix(self, embeddings=None, system_ids: list[int] | None = None) -> int:
        start = time.perf_counter()
        self.llama.clear()
        if embeddings is not None:
            self.prefix_positions = self.llama.inject(embeddings, warm_ids=self.warm_ids)
        elif system_ids:
            self.prefix_positions = self.llama.prefix_from_tokens(system_ids)
        else:
            self.prefix_positions = 0
        self.prefix_s = time.perf_counter() - start
        return self.prefix_positions

    def generate(self, prompt: list[int], max_tokens: int, *, temperature: float = 0.0, k: int = 0,
                 stop_ids: set[int] | None = None, on_token=None, guard=None, should_stop=None,
                 rng: np.random.Generator | None = None) -> Generated:
        """With `k`, the top-k rows come from the very logits that chose each token: no second pass."""
        callbacks = {name: f for name, f in (("on_token", on_token), ("should_stop", should_stop)) if f is not None}
        out = self.llama.generate_stats(prompt, max_tokens, temperature, stop_ids, rng=rng, guard=guard, topk=k,
                                        **callbacks)
        return Generated(list(out.tokens), out.stopped, out.topk_ids, out.topk_logprobs)

    def score(self, ids: list[int], first: int) -> float:
        self.llama.truncate(0)
        logits = torch.from_numpy(self.llama.eval(ids, all_logits=True)).float()
        logprobs = torch.log_softmax(logits[first - 1:-1], dim=-1)
        return float(-logprobs.gather(1, torch.tensor(ids[first:])[:, None]).mean())

    def first_token_s(self, prompt: list[int]) -> float:
        """The prefix's own time (measured once, in `set_prefix`) plus the prompt after it."""
        self.llama.truncate(0)
        start = time.perf_counter()
        int(self.llama.eval(prompt).argmax())
        return self.prefix_s + time.perf_counter() - start

    def kv_bytes(self, n_tokens: int) -> int:
        return n_tokens * self.llama.n_layers * 2 * self.llama.n_kv_heads * self.llama.head_dim * 2  # f16 cache

    @property
    def alive(self) -> bool:
        return getattr(self.llama, "alive", True)

    def close(self) -> None:
        self.llama.close()
