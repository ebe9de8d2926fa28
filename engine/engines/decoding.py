"""How answers are decoded, shared by chat, eval and self-study: settings and the loop guard.

A small model decoding greedily falls into loops ("in the port of the port of the port of ..."). The
guard does two things, both engines alike: with `no_repeat_ngram = n` it forbids any token that would
repeat an n-gram the answer already holds (the answer steers away), and whatever the setting it ends
the answer when a 6-gram comes back a third time, cutting it where the repetition began.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOOP_NGRAM, LOOP_TIMES = 6, 3


@dataclass
class Generated:
    """What a teacher generated: tokens, whether a stop token ended them, and (when asked) the top-k rows."""

    tokens: list[int]  # without a final stop token
    stopped: bool  # ended on the model's end-of-generation token (not on the length cap)
    topk_ids: np.ndarray | None = None  # [len(tokens) (+1: the stop token's row when stopped), k], best first
    topk_logprobs: np.ndarray | None = None


def stack_topk(ids_rows: list[np.ndarray], lp_rows: list[np.ndarray], k: int):
    """The per-token top-k rows as [n, k] arrays (int32 ids, float32 log-probs; n may be 0), or (None, None)
    when no rows were asked for (k = 0)."""
    if not k:
        return None, None
    return (np.stack(ids_rows) if ids_rows else np.zeros((0, k), np.int32),
            np.stack(lp_rows) if lp_rows else np.zeros((0, k), np.float32))


def loop_start(ids: list[int], n: int = LOOP_NGRAM, times: int = LOOP_TIMES) -> int | None:
    """Where an answer starts saying the same n tokens for the `times`-th time; None when it does not loop."""
    seen: dict[tuple, int] = {}
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= times:
            return i
    return None


@dataclass(frozen=True)
class Decoding:
    """Chat and eval decoding (`benchmarks/bench_decoding.py` compares `no_repeat_ngram` settings)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    no_repeat_ngram: int = 0  # 0: off; n: never repeat an n-gram of the answer


EVAL_ANSWER_TOKENS = 96  # eval's cap on a generated answer (accuracy); answers are full sentences
DEFAULT_DECODING = Decoding()


class LoopGuard:
    """Follows an answer token by token: `banned()` lists what may not come next, `cut` is set (and
    `stop` turns true) once the answer loops; the answer is then `tokens[:cut]`."""

    def __init__(self, no_repeat_ngram: int = 0):
        self.n = int(no_repeat_ngram)
        self.tokens: list[int] = []
        self._next: dict[tuple, set[int]] = {}  # (n-1)-gram -> tokens that followed it
        self._grams: dict[tuple, list[int]] = {}  # LOOP_NGRAM-gram -> where it started
        self.cut: int | None = None

    @property
    def stop(self) -> bool:
        return self.cut is not None

    def banned(self) -> list[int]:
        if self.n < 1 or len(self.tokens) < self.n - 1:
            return []
        key = tuple(self.tokens[len(self.tokens) - self.n + 1:]) if self.n > 1 else ()
        return sorted(self._next.get(key, ()))

    def add(self, token: int) -> None:
        self.tokens.append(int(token))
        t = self.tokens
        if self.n >= 1 and len(t) >= self.n:
            key = tuple(t[len(t) - self.n:-1]) if self.n > 1 else ()
            self._next.setdefault(key, set()).add(t[-1])
        if self.cut is None and len(t) >= LOOP_NGRAM:
            starts = self._grams.setdefault(tuple(t[-LOOP_NGRAM:]), [])
            starts.append(len(t) - LOOP_NGRAM)
            if len(starts) >= LOOP_TIMES:
                self.cut = starts[1]  # keep the first saying, drop the repeats

    def kept(self) -> list[int]:
        return self.tokens if self.cut is None else self.tokens[:self.cut]


def accept(token: int, out: list[int], stop_ids: set[int], on_token, guard: LoopGuard | None) -> str | None:
    """Take one chosen token into `out` (streamed to `on_token`, followed by `guard`): None to go on,
    "stop" when it is a stop token (not kept), "cut" when the guard ends the answer. Both engines decode
    through this, so they end answers alike."""
    if token in stop_ids:
        return "stop"
    out.append(token)
    if on_token is not None:
        on_token(token)
    if guard is not None:
        guard.add(token)
        if guard.stop:
            return "cut"
    return None


def stop_ids(tokenizer) -> set[int]:
    """The ids that end an answer: EOS and the chat templates' end-of-turn tokens."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return {i for i in ids if i is not None}


def turn_end_id(tokenizer) -> int:
    """The stop id the chat template closes an assistant turn with (EOS when the template shows none)."""
    stops = stop_ids(tokenizer)
    try:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                            tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in newer transformers
    except Exception:  # a tokenizer without a chat template
        ids = []
    ends = [int(i) for i in ids if int(i) in stops]
    return ends[-1] if ends else tokenizer.eos_token_id


def contains_all(answer: str, expect: list[str]) -> bool:
    """Eval's accuracy test: the answer holds every expected string, ignoring case."""
    low = answer.lower()
    return all(str(e).lower() in low for e in expect)
