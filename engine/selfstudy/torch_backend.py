"""Self-study on torch: several chunks decoded as one left-padded batch, both turns of a conversation
continuing from the chunk's system-prompt KV (prefilled once per chunk).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from engine.engines.decoding import stop_ids
from engine.engines.models import LoadedModel, chat_ids
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

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- batched decoding


@dataclass
class _Decoded:
    ids: list[int]
    finished: bool  # stopped on a stop token (included in ids when keep_stop)
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


def _fork(cache, rows: list[int] | None = None):
    """A new DynamicCache over the same prefix tensors (the model appends by concatenation, so the
    source is never modified), optionally keeping only some batch rows."""
    from transformers import DynamicCache

    layers = []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        if rows is not None:
            index = torch.tensor(rows, device=keys.device)
            keys, values = keys.index_select(0, index), values.index_select(0, index)
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)


class _PrefixCache:
    """Prefills a batch's system prompts, each distinct prompt once, and keeps the last batch's result:
    with a corpus-wide teacher every job shares one long prompt, prefilled once for many batches."""

    def __init__(self, lm: LoadedModel, pad_id: int):
        self.lm, self.pad_id = lm, pad_id
        self.key, self.cache, self.mask = None, None, None

    def rows(self, prefixes: list[list[int]]):
        """(cache, mask, row per job): cache rows are the distinct prefixes, never modified by decoding."""
        distinct = list(dict.fromkeys(tuple(p) for p in prefixes))
        if distinct != self.key:
            self.cache = self.mask = None  # free the old prefill before making the next one
            self.cache, self.mask = _prefill(self.lm, [list(p) for p in distinct], self.pad_id)
            self.key = distinct
        index = {p: i for i, p in enumerate(distinct)}
        return self.cache, self.mask, [index[tuple(p)] for p in prefixes]


@torch.no_grad()
def _prefill(lm: LoadedModel, prefixes: list[list[int]], pad_id: int):
    """Left-padded prefill of the shared system prompts; returns (cache, mask).

    Many tokens per call: here bf16 autocast pays off (~1.8x on an AVX512-BF16 CPU).
    """
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for row, p in enumerate(prefixes):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with lm.autocast():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.cache, mask


@torch.no_grad()
def _decode(
    lm: LoadedModel,
    cache,
    prefix_mask: torch.Tensor,
    suffixes: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    k: int,
    stop: set[int],
    pad_id: int,
    generator: torch.Generator | None,
) -> list[_Decoded]:
    """Feed each row's suffix after its prefix, then decode. Suffixes are left-padded so all rows end in
    the same column; positions come from the attention mask, so padding never shifts a row.

    With k > 0, the top-k log-probs of every decoded position are taken from the logits that chose the
    token (no second forward pass).
    """
    batch = len(suffixes)
    width = max(len(s) for s in suffixes)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, s in enumerate(suffixes):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    ids, mask = ids.to(lm.device), torch.cat([prefix_mask, mask.to(lm.device)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]

    out_ids = [[] for _ in range(batch)]
    out_topk = [[] for _ in range(batch)]
    out_lp = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(max_new_tokens):
        # No autocast here: it re-casts every weight matrix at each call, which costs more than it saves
        # when a step processes one token per row (measured ~1.4x slower on CPU).
        result = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                          use_cache=True, logits_to_keep=1)
        cache = result.cache
        logits = result.logits[:, -1].float()
        if k:
            top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            top_ids, top_lp = top.indices.cpu().numpy(), top.values.cpu().numpy()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            # Greedy = the teacher's top-1 (argmax and topk may break bf16 ties differently).
            chosen = top.indices[:, 0] if k else logits.argmax(-1)
        chosen_list = chosen.tolist()
        for row in range(batch):
            if done[row]:
                continue
            token = chosen_list[row]
            out_ids[row].append(token)
            if k:
                out_topk[row].append(top_ids[row])
                out_lp[row].append(top_lp[row])
            if token in stop:
                done[row] = True
        if all(done):
            break
        # Finished rows keep feeding their last token, masked out, so the batch stays rectangular.
        ids = torch.tensor([[row[-1]] for row in out_ids], device=lm.device)
        step_mask = torch.tensor([[0 if d else 1] for d in done], device=lm.device, dtype=mask.dtype)
        mask = torch.cat([mask, step_mask], dim=1)
        positions = positions[:, -1:] + 1
    results = []
    for row in range(batch):
        finished = bool(out_ids[row]) and out_ids[row][-1] in stop
        topk_ids = np.stack(out_topk[row]).astype(np.int32) if k and out_topk[row] else np.zeros((0, k), np.int32)
        topk_lp = np.stack(out_lp[row]).astype(np.float16) if k and out_lp[row] else np.zeros((0, k), np.float16)
        results.append(_Decoded(out_ids[row], finished, topk_ids, topk_lp))
    return results


# ----------------------------------------------------------------------------- torch backend


@dataclass
class _Job:
    chunk: object
    prefix: list[int]  # the chunk's system-prompt ids, shared by both turns
    seed_type: str = ""
    seed: str = ""
    user: str = ""
    rng: random.Random | None = None  # this conversation's own stream (see slot_random)


def _suffix(lm: LoadedModel, job: _Job, user_content: str) -> list[int] | None:
    system = chunk_system_prompt(job.chunk)
    full = chat_ids(lm.tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user_content}],
                    add_generation_prompt=True)
    if full[: len(job.prefix)] != job.prefix:
        return None  # the template does not render the system turn as a prefix: cannot share its KV
    return full[len(job.prefix):]


def _synthesize_torch(lm: LoadedModel, chunks: Iterable, n: int, *, seeds, k, temperature, max_user_tokens,
                      max_answer_tokens, batch_size, on_progress, seed) -> Iterator[Conversation]:
    generator = torch.Generator(device=lm.device).manual_seed(seed)  # batched sampling: one stream per call
    tok = lm.tokenizer
    pad_id = lm.pad_id
    stop = stop_ids(tok)
    produced = 0
    chunk_iter = enumerate(chunks)
    exhausted = False
    prefixes = _PrefixCache(lm, pad_id)
    while produced < n and not exhausted:
        jobs: list[_Job] = []
        while len(jobs) < min(batch_size, n - produced):
            try:
                index, chunk = next(chunk_iter)
            except StopIteration:
                exhausted = True
                break
            prefix = chat_ids(tok, [{"role": "system", "content": chunk_system_prompt(chunk)}], add_generation_prompt=False)
            jobs.append(_Job(chunk, prefix, rng=slot_random(seed, chunk, index)[0]))
        if not jobs:
            break
        cache, prefix_mask, row_of = prefixes.rows([j.prefix for j in jobs])

        # Turn 1: a user message per chunk, sampled; a rejected one is retried once with another seed.
        pending = list(range(len(jobs)))
        for attempt in range(2):
            if not pending:
                break
            suffixes, asking, still = [], [], []
            for i in pending:
                jobs[i].seed_type, jobs[i].seed = draw_seed(seeds, jobs[i].rng, avoid=jobs[i].seed)
                if is_direct(jobs[i].seed):
                    jobs[i].user = fill_seed(jobs[i].seed, jobs[i].chunk, jobs[i].rng) or ""
                    if not jobs[i].user:
                        still.append(i)
                    continue
                asking.append(i)
                suffixes.append(_suffix(lm, jobs[i], jobs[i].seed) or [])
            if any(not s for s in suffixes):
                raise UserError("this model's chat template does not render the system turn as a prefix of the "
                                "conversation, which self-study relies on; use another model")
            rows = [row_of[i] for i in asking]
            decoded = _decode(lm, _fork(cache, rows), prefix_mask[rows], suffixes, max_user_tokens,
                              temperature=temperature, k=0, stop=stop, pad_id=pad_id,
                              generator=generator) if asking else []
            for i, d in zip(asking, decoded):
                ids = [t for t in d.ids if t not in stop]
                message, finished = clean_user_message(tok.decode(ids, skip_special_tokens=True)), d.finished
                if not finished and (cut := salvage_truncated(message)) is not None:
                    message, finished = clean_user_message(cut), True
                if is_bad_user_message(message, jobs[i].seed, finished):
                    log.debug("rejected user message (%s, finished=%s): %r", jobs[i].seed_type, d.finished, message)
                    still.append(i)
                else:
                    jobs[i].user = message
            pending = still
        suffix_of = {i: _suffix(lm, j, j.user) for i, j in enumerate(jobs) if j.user}
        good = [i for i, suffix in suffix_of.items() if suffix]
        if not good:
            continue

        # Turn 2: the greedy answer with the teacher's top-k, from the same prefix KV.
        suffixes = [suffix_of[i] for i in good]
        rows = [row_of[i] for i in good]
        decoded = _decode(lm, _fork(cache, rows), prefix_mask[rows], suffixes, max_answer_tokens,
                          temperature=0.0, k=k, stop=stop, pad_id=pad_id, generator=generator)
        del cache
        for i, d in zip(good, decoded):
            keep = kept_answer_length(d.ids)
            if keep is None:
                continue
            answer, topk_ids, topk_lp = d.ids[:keep], d.topk_ids[:keep], d.topk_logprobs[:keep]
            if not [t for t in answer if t not in stop] or produced >= n:
                continue
            files, hashes = chunk_sources(jobs[i].chunk)
            yield Conversation(user=jobs[i].user, answer_ids=answer, topk_ids=topk_ids, topk_logprobs=topk_lp,
                               files=files, file_hashes=hashes, seed_type=jobs[i].seed_type,
                               slot=getattr(jobs[i].chunk, "slot", None))
            produced += 1
            if on_progress is not None:
                on_progress(produced, n)
