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
import re

import numpy as np

from engine.engines.decoding import turn_end_id
from engine.selfstudy.conversations import Conversation
from engine.selfstudy.prompts import body_sentences, find_names

OPENING_WORDS = 10  # what the user quotes to name the passage
ANSWER_TOKENS = 96  # the passage that follows
OFF_ROW = -30.0  # log-probability of the rows beside the quoted token (exp: ~1e-13)
# What a cloze blanks out: capitalised words in a row ("Ines Calloway-Dunn", "Room"), or a figure ("£32",
# "9:00 AM", "1,200").
FACT = re.compile(r"\b[A-Z][\w'’-]+(?:[ \t]+[A-Z][\w'’-]+)*|£?\b\d(?:[\d,:]*\d)?(?:\.\d+)?(?:[ \t]?(?:AM|PM|am|pm|%))?")


def verbatim_count(n_train: int, share: float) -> int:
    """Quoting conversations trained beside `n_train` self-study ones."""
    return round(n_train * share) if share > 0 else 0


def _one_hot_target(tokens: list[int], stop: int, k: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """`tokens` and the turn end as the answer, with one-hot teacher rows."""
    ids = list(tokens) + [stop]
    rows = np.repeat(np.asarray(ids, np.int32)[:, None], k, axis=1)
    logprobs = np.full((len(ids), k), OFF_ROW, np.float32)
    logprobs[:, 0] = 0.0
    return ids, rows, logprobs


def _quote(user: str, tokens: list[int], stop: int, k: int, chunk, seed_type: str) -> Conversation:
    """A conversation answered with `tokens` of the corpus, word for word."""
    ids, rows, logprobs = _one_hot_target(tokens, stop, k)
    return Conversation(user=user, answer_ids=ids, topk_ids=rows, topk_logprobs=logprobs, files=list(chunk.files),
                        file_hashes=list(chunk.file_hashes), seed_type=seed_type)


def _whole_sentences(chunk, min_words: int, max_words: int) -> list[str]:
    """The chunk's sentences of `min_words` to `max_words`, leaving out its first and last pieces, which may be
    cut mid-sentence."""
    return [s for s in body_sentences(chunk.text)[1:-1] if min_words <= len(s.split()) <= max_words]


def verbatim_conversations(tokenizer, sampler, n: int, seed: int | str, *, k: int = 20,
                           only_files: set[str] | None = None, cloze: float = 0.0,
                           topics: float = 0.0, spread: bool = False) -> list[Conversation]:
    """`n` quoting conversations from passages drawn from `sampler`'s corpus (or only `only_files`), seeded,
    at random or, with `spread`, stratified across it (see `ChunkSampler.stratified`); a `cloze` share of them
    are fill-in-the-blank sentences instead (see `cloze_conversations`), a `topics` share questions about a
    name answered with the sentences that give it (see `topic_conversations`)."""
    n_cloze, n_topics = round(n * cloze), round(n * topics)
    made = cloze_conversations(tokenizer, sampler, n_cloze, seed, k=k, only_files=only_files) if n_cloze else []
    if n_topics:
        made += topic_conversations(tokenizer, sampler, n_topics, seed, k=k, only_files=only_files)
    rng = random.Random(f"verbatim-{seed}")
    stop = turn_end_id(tokenizer)  # where the teacher's own answers end
    # the planned passages first; random ones once they are used up (some are too short to quote)
    planned = iter(sampler.stratified(n - len(made), ANSWER_TOKENS + 40, rng, only_files) if spread else ())
    for _attempt in range(4 * n):
        if len(made) >= n:
            break
        chunk = next(planned, None)
        if chunk is None:
            chunk = sampler.sample(ANSWER_TOKENS + 40, rng, only_files)
        words = " ".join(line for line in chunk.text.splitlines() if not line.startswith("### File:")).split()
        if len(words) < OPENING_WORDS + 8:
            continue  # a passage too short to quote
        opening, passage = " ".join(words[:OPENING_WORDS]), " ".join(words[OPENING_WORDS:])
        tokens = tokenizer(passage, add_special_tokens=False)["input_ids"][:ANSWER_TOKENS]
        made.append(_quote(f'How does the text continue after "{opening}"?', tokens, stop, k, chunk, "verbatim"))
    return made


def cloze_conversations(tokenizer, sampler, n: int, seed: int | str, *, k: int = 20,
                        only_files: set[str] | None = None) -> list[Conversation]:
    """`n` fill-in-the-blank conversations: the user gives a sentence of the corpus with one name or figure
    blanked out and the answer is the whole sentence. Unlike a continuation, the missing fact must be found
    from words on both sides of it, as a question names a fact by what surrounds it ("the chair is ___")."""
    rng = random.Random(f"cloze-{seed}")
    stop = turn_end_id(tokenizer)
    made: list[Conversation] = []
    for _attempt in range(8 * n):
        if len(made) >= n:
            break
        chunk = sampler.sample(ANSWER_TOKENS + 40, rng, only_files)
        sentences = _whole_sentences(chunk, 8, 60)
        candidates = [(s, m) for s in sentences for m in FACT.finditer(s) if m.start() > 0]
        if not candidates:
            continue
        sentence, match = rng.choice(candidates)
        tokens = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if len(tokens) > ANSWER_TOKENS:
            continue  # the answer is the whole sentence
        blanked = sentence[:match.start()] + "___" + sentence[match.end():]
        made.append(_quote(f'Fill in the blank from the text: "{blanked}"', tokens, stop, k, chunk, "cloze"))
    return made


def topic_conversations(tokenizer, sampler, n: int, seed: int | str, *, k: int = 20,
                        only_files: set[str] | None = None) -> list[Conversation]:
    """`n` conversations that ask what the text says about a name or figure of one of its sentences, answered
    with that sentence and the next, word for word. A question names a fact by its topic, not by the words
    just before it, so these train the way back from a topic to the folder's own sentence about it."""
    rng = random.Random(f"topic-{seed}")
    stop = turn_end_id(tokenizer)
    made: list[Conversation] = []
    for _attempt in range(8 * n):
        if len(made) >= n:
            break
        chunk = sampler.sample(ANSWER_TOKENS + 80, rng, only_files)
        sentences = _whole_sentences(chunk, 6, 80)
        candidates = [(i, name) for i, sentence in enumerate(sentences) for name in find_names(sentence)
                      if len(name) > 3]
        if not candidates:
            continue
        i, topic = rng.choice(candidates)
        if len(tokenizer(sentences[i], add_special_tokens=False)["input_ids"]) > ANSWER_TOKENS:
            continue  # the sentence that gives the topic is always whole
        tokens = tokenizer(" ".join(sentences[i:i + 2]), add_special_tokens=False)["input_ids"][:ANSWER_TOKENS]
        made.append(_quote(f"What does the text say about {topic}?", tokens, stop, k, chunk, "topic"))
    return made
