"""Quoting conversations: the user names the opening words of a passage of the corpus and the answer is the
passage that follows, word for word, with the text itself as the target (one-hot rows; no teacher).

A small teacher's self-study answers often get the folder's facts wrong (the bundled model answers a third
of the sample's questions right even with the whole folder in context), and the cartridge learns to
imitate them. Quoting conversations put the folder's own words into training next to self-study, at no
synthesis cost (no generation). They are made afresh from the run's seed for every run and resume, and
never held out: the held-out score stays the teacher's.
"""

from __future__ import annotations

import random

import numpy as np

from engine.engines.decoding import turn_end_id
from engine.selfstudy.conversations import Conversation

OPENING_WORDS = 10  # what the user quotes to name the passage
ANSWER_TOKENS = 96  # the passage that follows
OFF_ROW = -30.0  # log-probability of the rows beside the quoted token (exp: ~1e-13)


def verbatim_count(n_train: int, share: float) -> int:
    """Quoting conversations trained beside `n_train` self-study ones."""
    return round(n_train * share) if share > 0 else 0


def verbatim_conversations(tokenizer, sampler, n: int, seed: int | str, *, k: int = 20,
                           only_files: set[str] | None = None) -> list[Conversation]:
    """`n` quoting conversations from passages drawn from `sampler`'s corpus (or only `only_files`), seeded."""
    rng = random.Random(f"verbatim-{seed}")
    stop = turn_end_id(tokenizer)  # where the teacher's own answers end
    made: list[Conversation] = []
    for _attempt in range(4 * n):
        if len(made) >= n:
            break
        chunk = sampler.sample(ANSWER_TOKENS + 40, rng, only_files)
        words = " ".join(line for line in chunk.text.splitlines() if not line.startswith("### File:")).split()
        if len(words) < OPENING_WORDS + 8:
            continue  # a passage too short to quote
        opening, passage = " ".join(words[:OPENING_WORDS]), " ".join(words[OPENING_WORDS:])
        ids = list(tokenizer(passage, add_special_tokens=False)["input_ids"][:ANSWER_TOKENS]) + [stop]
        rows = np.repeat(np.asarray(ids, np.int32)[:, None], k, axis=1)
        logprobs = np.full((len(ids), k), OFF_ROW, np.float32)
        logprobs[:, 0] = 0.0
        made.append(Conversation(user=f'How does the text continue after "{opening}"?', answer_ids=ids,
                                 topk_ids=rows, topk_logprobs=logprobs, files=list(chunk.files),
                                 file_hashes=list(chunk.file_hashes), seed_type="verbatim"))
    return made
