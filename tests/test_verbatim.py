"""Quoting conversations: the corpus's own words, next to self-study, as training data."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from conftest import ASSETS
from engine.corpus.chunks import ChunkSampler, assemble, version_documents
from engine.corpus.ingest import ingest
from engine.engines.tokenizer import load_tokenizer
from engine.selfstudy.verbatim import OFF_ROW, cloze_conversations, topic_conversations, verbatim_conversations
from engine.store import registry
from engine.training import pipeline


def test_quoting_conversations_quote_the_corpus(db):
    documents = version_documents(db, ingest(ASSETS / "sample", db=db).version)
    sampler, tokenizer = ChunkSampler(documents), load_tokenizer(None)
    made = verbatim_conversations(tokenizer, sampler, 6, seed=3, k=5)
    text = "\n".join(line for line in assemble(documents).splitlines() if not line.startswith("### File:"))
    corpus = " ".join(text.split())  # the quoted words, without the file headers between files
    assert len(made) == 6
    for conv in made:
        opening = conv.user.split('"')[1]
        passage = tokenizer.decode(conv.answer_ids[:-1])
        assert f"{opening} {passage}" in corpus  # the passage that follows the quoted opening, word for word
        assert conv.answer_ids[-1] == tokenizer.eos_token_id  # it ends like an answer
        assert np.array_equal(conv.topk_ids[:, 0], conv.answer_ids) and conv.topk_ids.shape == (conv.n_tokens, 5)
        assert np.all(conv.topk_logprobs[:, 0] == 0) and np.all(conv.topk_logprobs[:, 1:] == OFF_ROW)
    again = verbatim_conversations(tokenizer, sampler, 6, seed=3, k=5)
    assert [c.user for c in again] == [c.user for c in made]  # seeded: a resumed run trains on the same
    only = {documents[0].path}
    assert all(set(c.files) <= only for c in verbatim_conversations(tokenizer, sampler, 4, seed=1, only_files=only))


def test_spread_quotes_cover_the_corpus_evenly_where_random_ones_leave_gaps(db):
    documents = version_documents(db, ingest(ASSETS / "sample", db=db).version)
    sampler, tokenizer = ChunkSampler(documents), load_tokenizer(None)

    def covered(spans):
        counts = np.zeros(sampler.n_tokens, int)
        for span in spans:
            counts[span.start:span.start + span.n_tokens] += 1
        return counts

    n, length = 80, 136  # the sample about twice over (with strata under half a span, no gap is possible)
    spread = sampler.stratified(n, length, random.Random(0))
    assert len(spread) == n and all(s.n_tokens == length for s in spread)
    starts = [s.start for s in spread]
    assert starts == sorted(starts)  # one per stratum, in order
    stride = (sampler.n_tokens - length + 1) / n
    assert all(math.floor(i * stride) <= s < (i + 1) * stride for i, s in enumerate(starts))
    inner = slice(length, sampler.n_tokens - length)  # away from the ends, which fewer spans can reach
    assert covered(spread)[inner].min() >= 1  # no passage left out
    rng = random.Random(0)
    assert covered([sampler.sample(length, rng) for _ in range(n)])[inner].min() == 0  # random starts leave gaps
    assert [s.start for s in sampler.stratified(n, length, random.Random(0))] == starts  # seeded

    only = {documents[0].path, documents[-1].path}
    spans = sampler.stratified(12, length, random.Random(1), only)
    assert all(set(s.files) <= only and len(s.files) == 1 for s in spans)  # never past a file's end
    assert {s.files[0] for s in spans} == only  # both files drawn
    lengths = {d.path: len(d.text) for d in documents if d.path in only}
    share = lengths[documents[0].path] / sum(lengths.values())
    first = sum(s.files[0] == documents[0].path for s in spans)
    assert abs(first - 12 * share) <= 1  # each file in proportion to its length
    quotes = verbatim_conversations(tokenizer, sampler, 8, seed=2, k=5, spread=True)
    assert len(quotes) == 8
    assert [q.user for q in quotes] != [q.user for q in verbatim_conversations(tokenizer, sampler, 8, seed=2, k=5)]


def test_cloze_conversations_blank_one_fact_of_a_corpus_sentence(db):
    documents = version_documents(db, ingest(ASSETS / "sample", db=db).version)
    sampler, tokenizer = ChunkSampler(documents), load_tokenizer(None)
    corpus = " ".join(assemble(documents).split())
    made = cloze_conversations(tokenizer, sampler, 8, seed=5, k=5)
    assert len(made) == 8 and all(c.seed_type == "cloze" for c in made)
    for conv in made:
        blanked = conv.user.split('"', 1)[1].rsplit('"', 1)[0]
        sentence = tokenizer.decode(conv.answer_ids[:-1])
        assert sentence in corpus  # the answer is a sentence of the corpus, word for word
        before, _, after = blanked.partition("___")
        assert sentence.startswith(before) and sentence.endswith(after)
        assert len(sentence) > len(before) + len(after)  # and the blank hides part of it
        assert conv.answer_ids[-1] == tokenizer.eos_token_id
        assert np.all(conv.topk_logprobs[:, 0] == 0) and np.all(conv.topk_logprobs[:, 1:] == OFF_ROW)
    mixed = verbatim_conversations(tokenizer, sampler, 8, seed=5, k=5, cloze=0.25)
    assert [c.seed_type for c in mixed].count("cloze") == 2 and len(mixed) == 8
    assert [c.user for c in mixed if c.seed_type == "verbatim"] == \
        [c.user for c in verbatim_conversations(tokenizer, sampler, 8, seed=5, k=5)][:6]  # the quotes stay seeded


def test_topic_conversations_answer_a_name_with_the_corpus_sentences_that_give_it(db):
    documents = version_documents(db, ingest(ASSETS / "sample", db=db).version)
    sampler, tokenizer = ChunkSampler(documents), load_tokenizer(None)
    corpus = " ".join(assemble(documents).split())
    made = topic_conversations(tokenizer, sampler, 8, seed=2, k=5)
    assert len(made) == 8 and all(c.seed_type == "topic" for c in made)
    for conv in made:
        topic = conv.user.removeprefix("What does the text say about ").removesuffix("?")
        answer = tokenizer.decode(conv.answer_ids[:-1])
        assert topic and topic in answer  # the answer is about the topic the user names ...
        assert all(part in corpus for part in re.split(r"(?<=[.!?])\s+", answer))  # ... in the corpus's words
        assert conv.answer_ids[-1] == tokenizer.eos_token_id
    mixed = verbatim_conversations(tokenizer, sampler, 8, seed=2, k=5, topics=0.5)
    assert [c.seed_type for c in mixed].count("topic") == 4 and len(mixed) == 8


def test_training_adds_quoting_conversations(db):
    ingest(ASSETS / "sample", db=db)
    tiny = dict(p=16, conversations=12, steps=None, epochs=1.0, batch_size=2, chunk_tokens=96, max_answer_tokens=16,
                max_user_tokens=48, init="spread", heldout=0.0)
    plain = pipeline.train(db, "sample", verbatim=0.0, **tiny)
    quoting = pipeline.train(db, "sample", verbatim=0.5, **tiny)  # the same 12 conversations and 6 quotes
    assert (plain.steps, quoting.steps) == (6, 9)
    cloze = pipeline.train(db, "sample", verbatim=0.5, cloze=0.5, **tiny)  # trains with 3 fill-in-the-blank of 6
    assert cloze.steps == 9
    assert registry.get_version(db, registry.get_corpus(db, "sample"), cloze.version)["status"] == "ready"
    assert registry.get_version(db, registry.get_corpus(db, "sample"), quoting.version)["status"] == "ready"


def test_heldout_scores_compare_only_between_cartridges_with_the_same_quoting_share(tmp_path, db):
    """Quoting conversations lower the held-out score (the teacher is imitated less) while answers improve:
    the watcher's guard must not hold such a retrain back because of a serving version trained without them."""
    import json

    from conftest import write
    from engine.selfstudy.conversations import Conversation
    from engine.training.pipeline import _comparable_serving, _paired_scores, _worse_than_serving, make_config

    root = tmp_path / "notes"
    write(root, "a.md", "The ferry leaves at 7:40 from pier 3.\n")
    corpus = ingest(root, db=db).corpus
    write(root, "a.md", "The ferry leaves at 8:10 from pier 3.\n")
    ingest(root, name=corpus["name"], db=db)
    old, new = (registry.get_version(db, corpus, n) for n in (1, 2))
    folder = tmp_path / "cartridge-v1"
    folder.mkdir()
    (folder / "cartridge.json").write_text(json.dumps({"training": {"train": {"verbatim": 0.0}}}))
    registry.update_version(db, old["id"], status="ready", cartridge=str(folder))
    registry.set_current_version(db, registry.get_corpus(db, corpus["name"]), 1)

    serving = _comparable_serving(db, corpus, new, make_config("quick", verbatim=0.0))
    assert serving["number"] == 1
    assert "v1 keeps serving" in _worse_than_serving(corpus, new, serving, (0.6, 0.9))
    assert _worse_than_serving(corpus, new, serving, (0.87, 0.9)) is None  # within the margin
    # Held-out conversations reused from an earlier version (no synthesis slot): the serving cartridge
    # trained on them, so they are no fair question; with fewer than two others there is no comparison.
    reused = [Conversation("q", [1], [[1]], [[0.0]], seed_type="structuring") for _ in range(3)]
    fresh = Conversation("q", [1], [[1]], [[0.0]], seed_type="structuring", slot=(0, 1))
    assert _paired_scores(None, folder, serving, reused + [fresh], make_config("quick")) is None
    assert _comparable_serving(db, corpus, new, make_config("quick")) is None  # quick quotes: not comparable


def test_the_kept_state_is_chosen_on_held_out_answers_and_recall_probes_together(db):
    """Quoting lowers how well the teacher's phrasing is imitated: the state kept must weigh the folder's own
    words too, or training on quotes is thrown away (it was, on the sample, at 3 quotes per conversation)."""
    ingest(ASSETS / "sample", db=db)
    outcome = pipeline.train(db, "sample", p=16, conversations=12, steps=6, batch_size=2, chunk_tokens=96,
                             max_answer_tokens=16, max_user_tokens=48, init="spread", heldout=0.2, verbatim=1.0,
                             eval_every=2, lr=0.05)
    detail = outcome.heldout
    assert detail["conversations"] == 2 and detail["recall_probes"] == 4  # at least four probes
    curve = detail["curve"]
    assert [row[0] for row in curve] == [0, 2, 4, 6] and all(len(row) == 3 for row in curve)
    means = [(nll + recall) / 2 for _, nll, recall in curve]
    kept = [row for row in curve if row[0] == detail["best_step"]][0]
    assert detail["criterion"] == pytest.approx(min(means), abs=1e-4) == pytest.approx((kept[1] + kept[2]) / 2, abs=1e-4)
    assert (detail["nll_cartridge"], detail["recall"]) == (kept[1], kept[2])
    assert detail["recall_init"] == curve[0][2]
