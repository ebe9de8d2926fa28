"""Self-study synthesis: seed prompts, filtering, batched decoding with a shared prefix, teacher top-k."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.engines.decoding import loop_start
from engine.engines.models import chat_ids
from engine.errors import UserError
from engine.selfstudy import prompts, torch_backend
from engine.selfstudy.prompts import (
    chunk_features,
    chunk_system_prompt,
    clean_user_message,
    draw_seed,
    fill_seed,
    is_bad_user_message,
    is_direct,
    load_seed_prompts,
    mix_seeds,
    salvage_truncated,
)
from engine.selfstudy.synthesis import synthesize
from engine.selfstudy.torch_backend import _decode, _fork, _prefill
from tests.tiny_model import shared_tiny_lm

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class FakeChunk:
    text: str
    files: list
    file_hashes: list
    start: int = 0
    n_tokens: int = 0


CHUNKS = [
    FakeChunk("### File: hours.md\nThe makerspace opens at 9:00 on Saturdays.", ["hours.md"], ["a" * 64]),
    FakeChunk("Members pay 32 pounds a month; students pay 20 pounds and get weekday access to every room.",
              ["fees.md"], ["b" * 64]),
    FakeChunk("### File: tools.md\nThe laser cutter needs an induction.", ["tools.md"], ["c" * 64]),
]
SEEDS = {"question": ["Ask one question about the text."], "creative": ["Write a short poem request about it."]}


def test_load_seed_prompts(tmp_path):
    (tmp_path / "question.txt").write_text("First prompt\nspanning two lines\n---\nSecond prompt\n---\n\n")
    (tmp_path / "creative.txt").write_text("Only one\n")
    (tmp_path / "README.md").write_text("not a seed file")
    seeds = load_seed_prompts(tmp_path)
    assert seeds == {"creative": ["Only one"], "question": ["First prompt\nspanning two lines", "Second prompt"]}
    with pytest.raises(UserError):
        load_seed_prompts(tmp_path / "missing")


def test_bundled_seed_prompts_cover_all_types():
    seeds = load_seed_prompts(ASSETS / "seeds")
    assert set(prompts.SEED_TYPES) <= set(seeds)
    assert all(all("---" not in p for p in prompts) for prompts in seeds.values())


def test_a_seed_mix_draws_types_by_its_weights():
    import random
    from collections import Counter

    seeds = load_seed_prompts(ASSETS / "seeds")
    rng = random.Random(0)
    drawn = Counter(draw_seed(mix_seeds(seeds, "question:3, recall:1, creative:0"), rng)[0] for _ in range(2000))
    assert set(drawn) == {"question", "recall"}  # left out or weighted 0: never drawn
    assert 2.5 < drawn["question"] / drawn["recall"] < 3.5
    uniform = mix_seeds(seeds, "")
    assert uniform.weights is None and uniform == seeds
    # An empty mix draws exactly as the plain seed prompts do.
    assert [draw_seed(uniform, random.Random(5)) for _ in range(3)] == [draw_seed(seeds, random.Random(5)) for _ in range(3)]
    for bad in ("question:x", "poems:2", "question:0", "question:-1"):
        with pytest.raises(UserError):
            mix_seeds(seeds, bad)


@pytest.mark.parametrize("message,finished,bad", [
    ("What time does the makerspace open on Saturdays?", True, False),
    ("", True, True),
    ("What time does the makerspace open on Saturdays and", False, True),  # truncated at the length cap
    ("I'm ready to help! Please share the text.", True, True),
    ("Sure, here is a question: when does it open?", True, True),
    ("Ask one question about the text.", True, True),  # echoes the seed
    ("The user wants to know when the makerspace opens.", True, False),  # a description, but usable
    ("I'd be happy to put the text into a TOML file.", True, True),  # answers instead of asking
])
def test_user_message_filter(message, finished, bad):
    assert is_bad_user_message(message, "Ask one question about the text.", finished) is bad


@pytest.mark.parametrize("raw,clean", [
    ("User: When does it open?", "When does it open?"),
    ("**Question:** Who runs the lathe?", "Who runs the lathe?"),
    ('"How much is membership?"', "How much is membership?"),
    ("Questionable: keep me", "Questionable: keep me"),
    ('A user might ask: "Which room has the lathe?"', "Which room has the lathe?"),
])
def test_clean_user_message(raw, clean):
    assert clean_user_message(raw) == clean


@pytest.mark.parametrize("raw,kept", [
    ("When does the makerspace open on Saturdays? I also wonder about the rest of the week and", "When does the makerspace open on Saturdays?"),
    ("Please list the tools in the workshop as JSON.\n\nHere is what I would like to see in it, with", "Please list the tools in the workshop as JSON."),
    ("John: hi there\n\nJane: hello and welcome to the", None),
    ("Once upon a time there was a lathe that", None),
])
def test_salvage_truncated(raw, kept):
    assert salvage_truncated(raw) == kept


def test_system_prompt_gets_a_file_header_only_when_missing():
    assert chunk_system_prompt(CHUNKS[0]).count("### File: hours.md") == 1
    assert "### File: fees.md\nMembers pay" in chunk_system_prompt(CHUNKS[1])
    assert chunk_system_prompt(CHUNKS[0]).startswith("You are in a conversation about the following user information.")


def test_batched_decode_with_padding_matches_single_sequences():
    lm = shared_tiny_lm()
    tok = lm.tokenizer
    prefixes = [chat_ids(tok, [{"role": "system", "content": chunk_system_prompt(c)}], False) for c in CHUNKS]
    users = ["hi", "what is the fee for students in the makerspace?", "ok"]
    suffixes = [chat_ids(tok, [{"role": "system", "content": chunk_system_prompt(c)}, {"role": "user", "content": u}],
                         True)[len(p):] for c, p, u in zip(CHUNKS, prefixes, users)]
    cache, mask = _prefill(lm, prefixes, tok.pad_token_id)
    got = _decode(lm, _fork(cache), mask, suffixes, 6, temperature=0, k=5, stop=set(), pad_id=tok.pad_token_id,
                  generator=None)
    for prefix, suffix, row in zip(prefixes, suffixes, got):
        ids, lps = list(prefix + suffix), []
        with torch.no_grad():
            for _ in range(6):
                logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
                lps.append(torch.log_softmax(logits, -1).topk(5))
                ids.append(int(logits.argmax()))
        assert row.ids == ids[len(prefix + suffix):]
        np.testing.assert_array_equal(row.topk_ids, np.stack([t.indices.numpy() for t in lps]))
        np.testing.assert_allclose(row.topk_logprobs.astype(np.float32), np.stack([t.values.numpy() for t in lps]),
                                   atol=1e-2)
    # Forking left the shared prefix untouched: decoding again gives the same tokens.
    again = _decode(lm, _fork(cache), mask, suffixes, 6, temperature=0, k=5, stop=set(), pad_id=tok.pad_token_id,
                    generator=None)
    assert [r.ids for r in again] == [r.ids for r in got]


def test_decode_stops_per_row():
    lm = shared_tiny_lm()
    prefixes = [[1, 500, 501], [1, 700]]
    cache, mask = _prefill(lm, prefixes, 2)
    free = _decode(lm, _fork(cache), mask, [[9], [10]], 8, temperature=0, k=0, stop=set(), pad_id=2, generator=None)
    stop_token = free[0].ids[2]
    stopped = _decode(lm, _fork(cache), mask, [[9], [10]], 8, temperature=0, k=0, stop={stop_token}, pad_id=2,
                      generator=None)
    assert stopped[0].ids == free[0].ids[:3] and stopped[0].finished
    if stop_token not in free[1].ids:
        assert stopped[1].ids == free[1].ids and not stopped[1].finished


def test_synthesize_tiny_model(monkeypatch):
    """The random tiny model writes gibberish, so the user-message filter is switched off here."""
    monkeypatch.setattr(torch_backend, "is_bad_user_message", lambda message, seed, finished: not message)
    lm = shared_tiny_lm()
    progress = []
    convs = list(synthesize(lm, CHUNKS, 3, seeds=SEEDS, k=6, max_user_tokens=5, max_answer_tokens=7, batch_size=2,
                            on_progress=lambda done, total: progress.append((done, total)), seed=3))
    assert len(convs) == 3 and progress == [(1, 3), (2, 3), (3, 3)]
    for conv, chunk in zip(convs, CHUNKS):
        assert conv.files == chunk.files and conv.file_hashes == chunk.file_hashes
        assert conv.seed_type in SEEDS and conv.user
        assert conv.topk_ids.shape == conv.topk_logprobs.shape == (conv.n_tokens, 6) and conv.n_tokens == 7
        assert np.array_equal(conv.topk_ids[:, 0], conv.answer_ids)  # greedy answer = teacher's top-1
        assert np.all(np.diff(conv.topk_logprobs.astype(np.float32), axis=1) <= 0)
        # The stored distributions are the teacher's: chunk in the system prompt, user message, answer so far.
        prompt = chat_ids(lm.tokenizer, [{"role": "system", "content": chunk_system_prompt(chunk)},
                                         {"role": "user", "content": conv.user}], add_generation_prompt=True)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([prompt + conv.answer_ids.tolist()])).logits[0]
        ref = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + conv.n_tokens], -1).topk(6)
        np.testing.assert_allclose(conv.topk_logprobs.astype(np.float32), ref.values.numpy(), atol=1e-2)
    again = list(synthesize(lm, CHUNKS, 3, seeds=SEEDS, k=6, max_user_tokens=5, max_answer_tokens=7, batch_size=2, seed=3))
    assert [c.user for c in again] == [c.user for c in convs]  # seeded


def test_chunk_features_and_message_templates():
    import random

    text = ("### File: faq.md\n# ------------------------------\n## How do I join?\nCome to the front desk and pay the £15 deposit.\n\n## Opening hours\n"
            "The Wood Shop in Room 1 is run by Odile Brannagh. The building opens at 9:00 AM on Saturdays and at 11:00 AM "
            "on Sundays.\n")
    features = chunk_features(text)
    assert features["question"] == ["How do I join?"] and features["section"] == ["Opening hours"]
    assert {"Wood Shop in Room 1", "Odile Brannagh"} <= set(features["topic"]) and "Opening hours" in features["topic"]
    assert not any(t.startswith("The ") for t in features["topic"])  # sentence starts are not names
    assert features["opening"] == ["Come to the front desk and pay the", "The Wood Shop in Room 1 is run",
                                   "The building opens at 9:00 AM on Saturdays"]  # 8 words of each full sentence
    chunk = FakeChunk(text, ["faq.md"], ["a" * 64])
    rng = random.Random(0)
    assert not is_direct("Write one question about the text above.") and is_direct("Tell me about {topic}.")
    assert fill_seed("{question}", chunk, rng) == "How do I join?"
    assert fill_seed("Summarise \"{section}\".", chunk, rng) == 'Summarise "Opening hours".'
    assert fill_seed("What comes after \"{opening}\"?", chunk, rng).rstrip('"?').split('"')[1] in text
    assert fill_seed("{question}", FakeChunk("no headings here at all", [], []), rng) is None


def test_loop_start():
    assert loop_start([1, 2, 3, 4, 5, 6, 7, 8, 9]) is None
    looping = [9, 8] + [1, 2, 3] * 6
    cut = loop_start(looping, n=3, times=3)
    assert cut == 8 and looping[:cut] == [9, 8, 1, 2, 3, 1, 2, 3]  # two rounds of the loop are kept


def test_message_templates_skip_the_user_turn():
    """A template seed is the user message itself; one the chunk cannot fill is redrawn, then skipped."""
    lm = shared_tiny_lm()
    seeds = {"question": ["What does the text say about {topic}?"]}
    convs = list(synthesize(lm, CHUNKS, 3, seeds=seeds, k=4, max_answer_tokens=5, batch_size=3))
    # Only the hours chunk names something (a figure joined to a capitalised word); the others are skipped.
    assert [c.files for c in convs] == [["hours.md"]]
    assert convs[0].user == "What does the text say about 9:00 on Saturdays?" and convs[0].seed_type == "question"


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="backend"):
        synthesize(shared_tiny_lm(), CHUNKS, 1, seeds=SEEDS, backend="nope")


def test_default_model_writes_a_conversation():
    from engine.engines.models import load_model

    lm = load_model(None, "cpu")
    chunks = [FakeChunk("### File: hours.md\nTidewater Makerspace opens at 9:00 AM on Saturdays and closes at "
                        "6:00 PM. It is closed on Mondays for cleaning.", ["hours.md"], ["a" * 64])] * 3
    seeds = {"question": ["Write one question a user might ask that starts with \"When\" and can be answered from "
                          "the text above. Output only the user's question, with no preamble."]}
    convs = list(synthesize(lm, chunks, 1, seeds=seeds, max_user_tokens=32, max_answer_tokens=12, batch_size=3))
    assert len(convs) == 1
    conv = convs[0]
    assert conv.user and not is_bad_user_message(conv.user, seeds["question"][0], True)
    assert conv.topk_ids.shape == (conv.n_tokens, 20) and np.array_equal(conv.topk_ids[:, 0], conv.answer_ids)
