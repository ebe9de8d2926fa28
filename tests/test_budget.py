"""The self-study budget grows with the corpus between a floor and a cap, every file is studied, and the
plan (with its cost) is stated before training starts."""

from __future__ import annotations

from engine.corpus import ChunkSampler, Document
from engine.pipeline import Plan, make_config, plan_message


def test_conversations_scale_with_the_corpus_between_floor_and_cap():
    quick = make_config("quick")
    counts = [quick.conversations_for(tokens) for tokens in (500, 5_000, 10_000, 28_000, 2_000_000)]
    assert counts == [96, 96, 160, 256, 256]
    assert make_config("quick", conversations=40).conversations_for(28_000) == 40  # an explicit count stays
    standard = make_config("standard")
    assert standard.conversations_for(2_000_000) == standard.max_conversations > standard.conversations_for(100_000)


def test_the_plan_states_counts_and_cost_before_training():
    quick = make_config("quick")
    line = plan_message(Plan("full", 256), quick, 28_000, "cpu")
    assert line.startswith("plan: 256 self-study conversations (16 per 1k of 28,000 tokens, floor 96, cap 256)")
    assert "training steps of 4" in line and "min on a 2-core CPU" in line
    assert "min" not in plan_message(Plan("full", 256), quick, 28_000, "cuda")
    inc = plan_message(Plan("incremental", 30, 1, 24, 6, ["a.md"]), quick, 28_000, "cpu")
    assert "incremental from v1: 24 conversations reused, 6 new about 1 changed file(s)" in inc


def test_every_file_is_studied_when_the_count_allows():
    docs = [Document("big.md", "0" * 64, "Lighthouse keepers log the weather every hour. " * 400)] + [
        Document(f"small{i}.md", str(i) * 64, f"Small note {i} about buoy number {i}.\n") for i in range(8)]
    sampler = ChunkSampler(docs)
    chunks = sampler.sample_many(12, 64, seed=3, cover=True)
    assert {path for c in chunks for path in c.files} == {d.path for d in docs}
    plain = sampler.sample_many(12, 64, seed=3)
    assert {path for c in plain for path in c.files} < {d.path for d in docs}  # by size alone, small files are missed
    assert [c.text for c in sampler.sample_many(12, 64, seed=3, cover=True)] == [c.text for c in chunks]
