"""The inference interface (`engine.engines.base`) on transformers: any supported model, on any device.

The prefix is kept as packed KV and a fresh cache is built from it for every call (the model appends to a
cache in place), so one engine serves any number of prompts in turn.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.cartridge.format import kv_bytes, prefix_embeddings, to_cache
from engine.engines.decoding import Generated, accept, stack_topk
from engine.engines.models import LoadedModel


class TorchEngine:
    name = "torch"

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.n_ctx = lm.max_positions
        self.prefix: torch.Tensor | None = None
        self.prefix_s = 0.0  # what building the prefix cost (an evaluated system prompt; a cartridge is free)

    @property
    def prefix_positions(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.shape[0])

    def set_prefix(self, embeddings=None, system_ids: list[int] | None = None) -> int:
        start = time.perf_counter()
        self.prefix = embeddings if embeddings is not None else (
            prefix_embeddings(self.lm, system_ids) if system_ids else None)
        self.prefix_s = time.perf_counter() - start if embeddings is None else 0.0
        return self.prefix_positions

    def _forward(self, ids: list[int], cache, n_before: int, **kwargs):
        mask = torch.ones(1, n_before + len(ids), dtype=torch.long, device=self.lm.device)
        return self.lm.model(input_ids=torch.tensor([ids], device=self.lm.device), attention_mask=mask,
                             cache=cache, use_cache=True, **kwargs)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_tokens: int, *, temperature: float = 0.0, k: int = 0,
                 stop_ids: set[int] | None = None, on_token=None, guard=None, should_stop=None,
                 rng: np.random.Generator | None = None) -> Generated:
        """A plain decode loop over a fresh cache, so that it can stream and stop on any id in `stop_ids`
        (default: the tokenizer's EOS)."""
        lm = self.lm
        if stop_ids is None:
            stop_ids = {lm.tokenizer.eos_token_id}
        generator = torch.Generator().manual_seed(int(rng.integers(2**63))) if rng is not None and temperature > 0 else None
        cache = to_cache(self.prefix, lm) if self.prefix is not None else None
        ids, n_before = list(prompt), self.prefix_positions
        out: list[int] = []
        rows_ids, rows_lp = [], []
        stopped = False
        with lm.autocast():
            for step in range(max_tokens):
                result = self._forward(ids, cache, n_before, logits_to_keep=1)
                n_before += len(ids)
                cache = result.cache
                logits = result.logits[0, -1].float().cpu()
                if guard is not None and (banned := guard.banned()):
                    logits[banned] = float("-inf")
                if temperature > 0:
                    token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
                else:
                    token = int(logits.argmax())
                if k:
                    top = torch.log_softmax(logits, -1).topk(k)
                    rows_ids.append(top.indices.numpy().astype(np.int32))
                    rows_lp.append(top.values.numpy().astype(np.float32))
                ended = accept(token, out, stop_ids, on_token, guard)
                if ended:
                    stopped = ended == "stop"
                    break
                if should_stop is not None and should_stop():
                    break
                ids = [token]
        return Generated(out, stopped, *stack_topk(rows_ids, rows_lp, k))

    @torch.no_grad()
    def score(self, ids: list[int], first: int) -> float:
        cache = to_cache(self.prefix, self.lm) if self.prefix is not None else None
        with self.lm.autocast():
            logits = self._forward(ids, cache, self.prefix_positions).logits[0].float()
        logprobs = torch.log_softmax(logits[first - 1:-1], dim=-1)
        return float(-logprobs.gather(1, torch.tensor(ids[first:], device=logits.device)[:, None]).mean())

    @torch.no_grad()
    def first_token_s(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        cache = to_cache(self.prefix, self.lm) if self.prefix is not None else None
        with self.lm.autocast():
            logits = self._forward(prompt, cache, self.prefix_positions, logits_to_keep=1).logits
        int(logits[0, -1].argmax())
        return self.prefix_s + time.perf_counter() - start

    def kv_bytes(self, n_tokens: int) -> int:
        return kv_bytes(n_tokens, self.lm)

    def close(self) -> None:
        self.prefix = None
