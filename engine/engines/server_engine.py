"""The inference interface (`engine.engines.base`) on an inference server (llama.cpp's `llama-server`,
vLLM, SGLang; see `engine.engines.server`).

A server generates with top-k log-probabilities, which is what self-study needs of a teacher. It takes no
cartridge (servers load none), and the app neither scores nor chats through one: those calls say so.
A server answers whole, so tokens are handed to `on_token` as they come back and `should_stop` ends the
answer there; a `LoopGuard`'s bans cannot reach the server, only its cut applies.
"""

from __future__ import annotations

import numpy as np

from engine.engines.decoding import Generated
from engine.engines.server import ServerClient
from engine.errors import UserError


class ServerInference:
    name = "server"
    n_ctx = None  # the server enforces its own context

    def __init__(self, client: ServerClient):
        self.client = client
        self.system: list[int] = []

    def set_prefix(self, embeddings=None, system_ids: list[int] | None = None) -> int:
        if embeddings is not None:
            raise UserError("an inference server takes no cartridge: chat with a cartridge on torch or llama.cpp")
        self.system = list(system_ids or [])  # sent with every prompt; servers cache a repeated prefix
        return len(self.system)

    def generate(self, prompt: list[int], max_tokens: int, *, temperature: float = 0.0, k: int = 0,
                 stop_ids: set[int] | None = None, on_token=None, guard=None, should_stop=None,
                 rng: np.random.Generator | None = None) -> Generated:
        """`rng` gives the request's seed, so that a sampled answer is the same whenever it is asked for."""
        seed = int(rng.integers(2**31)) if rng is not None else 0
        out = self.client.generate(self.system + list(prompt), max_tokens, temperature=temperature, k=k,
                                   stop_ids=stop_ids, seed=seed)
        for i, token in enumerate(out.tokens):
            if on_token is not None:
                on_token(token)
            if guard is not None:
                guard.add(token)
            if (guard is not None and guard.stop) or (should_stop is not None and should_stop()):
                if i + 1 < len(out.tokens) or out.stopped:  # the answer is cut here, not ended by the model
                    out.tokens, out.stopped = out.tokens[:i + 1], False
                    if out.topk_ids is not None:
                        out.topk_ids, out.topk_logprobs = out.topk_ids[:i + 1], out.topk_logprobs[:i + 1]
                break
        return out

    def score(self, ids: list[int], first: int) -> float:
        raise UserError("answers are not scored on an inference server: evaluate with --engine torch or llama.cpp")

    def first_token_s(self, prompt: list[int]) -> float:
        raise UserError("time to first token is not measured on an inference server")

    def kv_bytes(self, n_tokens: int) -> int:
        raise UserError("an inference server's KV memory is its own")

    def close(self) -> None:
        self.client.close()
