"""The self-study budget grows with the corpus between a floor and a cap, every file is studied, and the
plan (with its cost) is stated before training starts."""

from __future__ import annotations

import pytest

from engine.corpus.chunks import ChunkSampler, Document
from engine.errors import UserError
from engine.training.pipeline import Plan, make_config, plan_message


def test_conversations_scale_with_the_corpus_between_floor_and_cap():
    quick = make_config("quick")
    counts = [quick.conversations_for(tokens) for tokens in (500, 5_000, 10_000, 28_000, 2_000_000)]
    assert counts == [48, 48, 80, 224, 256]
    assert make_config("quick", conversations=40).conversations_for(28_000) == 40  # an explicit count stays
    assert make_config("quick", max_answer_tokens=24).max_answer_tokens == 24  # train --answer-tokens
    with pytest.raises(UserError, match="--answer-tokens must be positive"):
        make_config("quick", max_answer_tokens=0)
    with pytest.raises(UserError, match="chunk_questions must be at least 1"):
        make_config("quick", chunk_questions=0)
    for bad in ({"batch_size": 0}, {"chunk_tokens": -1}):  # refused before a model loads, or a watch starts
        with pytest.raises(UserError, match="--batch-size and --chunk-tokens must be at least 1"):
            make_config("quick", **bad)
    with pytest.raises(UserError, match="learning rate must be positive"):
        make_config("quick", lr=0.0)
    assert make_config("quick").quotes == "random" and make_config("quick", quotes="spread").quotes == "spread"
    with pytest.raises(UserError, match="unknown quotes 'even'"):
        make_config("quick", quotes="even")
    standard = make_config("standard")
    assert standard.conversations_for(2_000_000) == standard.max_conversations > standard.conversations_for(100_000)


def test_the_plan_states_counts_and_cost_before_training():
    quick = make_config("quick")
    line = plan_message(Plan("full", 256), quick, 28_000, "cpu")
    assert line.startswith("plan: 256 self-study conversations (8 per 1k of 28,000 tokens, floor 48, cap 256)")
    assert "1380 training steps of 2" in line and "min on a 2-core CPU" in line
    assert "min" not in plan_message(Plan("full", 256), quick, 28_000, "cuda")
    inc = plan_message(Plan("incremental", 30, 1, 24, 6, ["a.md"]), quick, 28_000, "cpu")
    assert "incremental from v1: 24 conversations reused, 6 new about 1 changed file(s)" in inc


def test_the_cpu_estimate_follows_the_matmul_type(monkeypatch):
    quick = make_config("quick", p=576)

    def minutes() -> int:
        line = plan_message(Plan("full", 48), quick, 4_992, "cpu")
        return int(line.rsplit("about ", 1)[1].split(" min")[0])

    monkeypatch.setenv("CARTRIDGE_CPU_BF16", "1")
    bf16 = minutes()
    monkeypatch.setenv("CARTRIDGE_CPU_BF16", "0")
    assert bf16 < minutes()  # bf16 matmuls train ~2.5x faster per example


def test_every_file_is_studied_when_the_count_allows():
    docs = [Document("big.md", "0" * 64, "Lighthouse keepers log the weather every hour. " * 400)] + [
        Document(f"small{i}.md", str(i) * 64, f"Small note {i} about buoy number {i}.\n") for i in range(8)]
    sampler = ChunkSampler(docs)
    chunks = sampler.sample_many(12, 64, seed=3, cover=True)
    assert {path for c in chunks for path in c.files} == {d.path for d in docs}
    plain = sampler.sample_many(12, 64, seed=3)
    assert {path for c in plain for path in c.files} < {d.path for d in docs}  # by size alone, small files are missed
    assert [c.text for c in sampler.sample_many(12, 64, seed=3, cover=True)] == [c.text for c in chunks]


def test_p_grows_with_the_corpus_and_keeps_the_kv_small():
    quick = make_config("quick")
    sizes = (600, 2_000, 2_500, 4_000, 5_000, 7_000, 8_000, 28_000)
    ps = [quick.p_for(tokens) for tokens in sizes]
    # the last two do not fit the 8,192-position context: half the cap, the other half left to retrieval
    assert ps == [128, 448, 512, 512, 576, 832, 512, 512]
    for tokens, p in zip(sizes[1:], ps[1:]):  # at least 4x smaller than the folder, 8x past 4k tokens
        assert tokens / p >= (8 if tokens > 4_000 else 4)
    assert ps[:6] == sorted(ps[:6])
    assert make_config("quick", p=300).p_for(28_000) == 300  # an explicit p stays


def test_an_incremental_retrain_keeps_a_nearby_p(db, tmp_path):
    from engine.store import registry
    from engine.corpus.ingest import ingest
    from engine.training.pipeline import choose_p

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.md").write_text("The ferry leaves at nine. " * 700)
    first = ingest(folder, db=db)
    corpus = first.corpus
    tokens = first.version["tokens"]
    quick = make_config("quick")
    assert choose_p(db, corpus, first.version, quick) == quick.p_for(tokens)
    cartridge = tmp_path / "cartridge"
    cartridge.mkdir()
    (cartridge / "cartridge.json").write_text('{"p": %d}' % (quick.p_for(tokens) - 64))
    registry.update_version(db, first.version["id"], status="ready", cartridge=str(cartridge))
    (folder / "b.md").write_text("The harbour office opens at eight. " * 40)
    second = ingest(folder, db=db).version
    assert choose_p(db, corpus, second, quick) == quick.p_for(tokens) - 64  # the warm start's p
    assert choose_p(db, corpus, second, quick, incremental=False) == quick.p_for(second["tokens"])
    (cartridge / "cartridge.json").write_text('{"p": 128}')  # too far from this size: the size's own p
    assert choose_p(db, corpus, second, quick) == quick.p_for(second["tokens"])


def test_a_small_edit_gets_a_few_new_conversations_whatever_the_batch_size():
    from engine.training.pipeline import _replay_count, new_conversations

    assert new_conversations(48, 0.01) == 4  # a tiny changed file: the floor
    assert new_conversations(48, 0.25) == 12  # a quarter of the corpus: a quarter of a full plan
    assert _replay_count(40, 4) == 8 and _replay_count(40, 12) == 12  # replayed beside them: as many, 8 at least
    assert _replay_count(200, 0) == 20  # no new conversations: a tenth of the reused ones
