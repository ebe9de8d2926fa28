"""Answer quality machinery: the loop guard, eval accuracy, the held-out score, best-state keeping and
the corpus-wide teacher."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ASSETS, ROOT, run_cli, write
from engine.errors import UserError
from engine.cartridge.format import cartridge_embeddings, create_cartridge_model
from engine.engines.decoding import LoopGuard, contains_all, loop_start, stop_ids
from engine.training.distill import HeldOut, TrainConfig, distill, split_heldout
from tests.test_training import CORPUS, teacher_conversations
from tests.tiny_model import shared_tiny_lm, tiny_lm


# -- the loop guard ---------------------------------------------------------------------------------

def test_loop_guard_cuts_where_the_repetition_began():
    guard = LoopGuard()
    answer = [5, 6] + [1, 2, 3] * 6 + [9]
    for token in answer:
        guard.add(token)
        if guard.stop:
            break
    assert guard.stop and guard.kept() == [5, 6, 1, 2, 3]
    assert loop_start(guard.kept()) is None


def test_loop_guard_bans_repeated_ngrams():
    guard = LoopGuard(no_repeat_ngram=3)
    for token in [1, 2, 3, 4, 1, 2]:
        guard.add(token)
    assert guard.banned() == [3]  # "1 2 3" was said already
    assert LoopGuard(no_repeat_ngram=0).banned() == []


LOOP_PROMPT = "Where is the dinghy moored?"  # the bundled model answers this with a loop when unguarded


def test_the_bundled_model_loops_on_the_test_prompt_without_the_guard():
    from engine.engines.llamacpp import LlamaCppEngine
    from engine.engines.models import chat_ids
    from engine.engines.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    with LlamaCppEngine(n_ctx=1024) as llama:
        ids = chat_ids(tokenizer, [{"role": "user", "content": LOOP_PROMPT}], add_generation_prompt=True)
        free = llama.generate(ids, max_new_tokens=160, stop_ids=stop_ids(tokenizer))
        guard = LoopGuard()
        llama.generate(ids, max_new_tokens=160, stop_ids=stop_ids(tokenizer), guard=guard)
    assert loop_start(free) is not None
    assert guard.stop and loop_start(guard.kept()) is None and len(guard.kept()) < len(free)


@pytest.mark.parametrize("engine", ["llama.cpp", "torch"])
def test_chat_answers_end_cleanly_with_and_without_a_cartridge(cartridge_home, engine):
    from engine.engines.tokenizer import load_tokenizer

    assert run_cli("ingest", str(ASSETS / "sample"), env_home=cartridge_home).returncode == 0
    flags = ["--tokens", "16", "--conversations", "4", "--steps", "2", "--chunk-tokens", "96", "--batch-size", "2",
             "--answer-tokens", "24", "--init", "spread"]
    assert run_cli("train", "sample", *flags, env_home=cartridge_home).returncode == 0
    tokenizer = load_tokenizer(None)
    for mode in ("none", "cartridge"):
        proc = run_cli("chat", "sample", "--mode", mode, "--engine", engine, "--json", "--max-tokens", "160",
                       "--prompt", LOOP_PROMPT, env_home=cartridge_home)
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)["answer"]
        assert answer and loop_start(tokenizer(answer, add_special_tokens=False)["input_ids"]) is None, (mode, answer)


# -- eval accuracy ----------------------------------------------------------------------------------

def test_eval_accuracy_counts_answers_holding_every_expected_string(tmp_path, cartridge_home):
    assert run_cli("ingest", str(ASSETS / "sample"), env_home=cartridge_home).returncode == 0
    qa = write(tmp_path, "qa.jsonl", "\n".join(json.dumps(x) for x in [
        {"question": "What is the capital of France?", "answer": "The capital of France is Paris.",
         "expect": ["paris"]},
        {"question": "What is the capital of France?", "answer": "The capital of France is Paris.",
         "expect": ["Paris", "Zanzibar-9"]},
        {"question": "What colour is the sky?", "answer": "The sky is blue."},
    ]) + "\n")
    proc = run_cli("eval", "sample", "--qa", str(qa), "--modes", "none", "--engine", "torch", "--json",
                   env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    none = doc["modes"]["none"]
    assert doc["graded"] == 2 and doc["answer_tokens"] > 0 and len(none["per_question"]) == 3
    assert [a["correct"] for a in none["answers"]] == [True, False], none["answers"]
    assert none["accuracy"] == 0.5
    plain = run_cli("eval", "sample", "--qa", str(qa), "--modes", "none", "--engine", "torch", env_home=cartridge_home)
    assert plain.returncode == 0 and "accuracy  50.0%" in plain.stdout, plain.stdout

    bad = write(tmp_path, "bad.jsonl", json.dumps({"question": "q", "answer": "a", "expect": "Paris"}) + "\n")
    proc = run_cli("eval", "sample", "--qa", str(bad), "--modes", "none", env_home=cartridge_home)
    assert proc.returncode == 2 and "bad.jsonl:1" in proc.stderr and proc.stderr.count("\n") == 1
    binary = write(tmp_path, "qa.bin", b"\xff\xfe\x00 not text")
    proc = run_cli("eval", "sample", "--qa", str(binary), "--modes", "none", env_home=cartridge_home)
    assert proc.returncode == 2 and "is not UTF-8 text" in proc.stderr and proc.stderr.count("\n") == 1


def test_qa_files_from_other_editors_and_empty_lines_or_modes(tmp_path, db):
    from engine.serve.evaluate import evaluate, read_qa

    line = json.dumps({"question": "Where is the dinghy?", "answer": "At berth 14."})
    bom = tmp_path / "bom.jsonl"
    bom.write_text(line + "\n", encoding="utf-8-sig")  # as Notepad writes UTF-8
    assert read_qa(bom) == [json.loads(line)]
    empty = write(tmp_path, "empty.jsonl", json.dumps({"question": "Where is the dinghy?", "answer": " "}) + "\n")
    with pytest.raises(UserError, match="empty.jsonl:1: the question and the answer must not be empty"):
        read_qa(empty)
    with pytest.raises(UserError, match="name at least one mode"):
        evaluate(db, "anything", bom, modes=())


def test_contains_all_ignores_case():
    assert contains_all("Opens at 9:00 AM on MONDAYS", ["mondays", "9:00"])
    assert not contains_all("Opens at 9:00", ["9:00", "Monday"])


QA_SETS = [(ASSETS / "sample_qa.jsonl", 30)] + [(path, 20) for path in
                                                 sorted((ROOT / "benchmarks" / "qa").glob("*_qa.jsonl"))]


@pytest.mark.parametrize("qa, at_least", QA_SETS, ids=[path.name for path, _ in QA_SETS])
def test_qa_expect_strings_are_in_their_answers_not_their_questions(qa, at_least):
    """The sample's and the benchmarks' question sets: every line graded, its gold answer passing its own test."""
    lines = [json.loads(line) for line in qa.read_text(encoding="utf-8").splitlines()]
    assert len(lines) >= at_least and all(line.get("expect") for line in lines)
    for line in lines:
        for expected in line["expect"]:
            assert expected.lower() not in line["question"].lower(), line
            assert expected.lower() in line["answer"].lower(), line


# -- held-out score and best state ------------------------------------------------------------------

def test_heldout_split_is_seeded_and_disjoint():
    items = [f"conversation {i}" for i in range(40)]
    train, held = split_heldout(items, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36 and not set(train) & set(held)
    assert split_heldout(items, 0.1, seed=3) == (train, held)
    assert split_heldout(items[:9], 0.1, seed=3) == (items[:9], [])  # too few to spare any


def test_training_keeps_the_best_heldout_state():
    lm = tiny_lm(seed=1)
    convs = teacher_conversations(lm) * 3
    train, held = convs[:8], convs[8:]
    peft_model = create_cartridge_model(lm, 8, CORPUS)
    cfg = TrainConfig(p=8, steps=8, batch_size=2, lr=3.0, eval_every=2)  # a rate that overshoots
    result = distill(peft_model, lm, train, cfg, heldout=held)
    h = result.heldout
    assert [step for step, _ in h["curve"]] == [0, 2, 4, 6, 8]
    assert h["nll_cartridge"] == min(nll for _, nll in h["curve"]) <= h["nll_init"]
    scorer = HeldOut(lm, held, cfg, 8)
    assert scorer.nll(peft_model) == pytest.approx(h["nll_cartridge"], abs=1e-4)  # the kept state is the best
    assert h["score"] == scorer.score(h["nll_cartridge"])
    saved = cartridge_embeddings(peft_model)
    assert torch.isfinite(saved).all()


def test_train_reports_and_stores_the_heldout_score(tmp_path, cartridge_home):
    assert run_cli("ingest", str(ASSETS / "sample"), env_home=cartridge_home).returncode == 0
    flags = ["--tokens", "16", "--conversations", "12", "--steps", "4", "--chunk-tokens", "96", "--batch-size", "2"]
    proc = run_cli("train", "sample", *flags, "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    detail = doc["heldout_detail"]
    assert doc["conversations"] == 10 and detail["conversations"] == 2  # two of the twelve held out
    assert doc["heldout"] == detail["score"] and detail["nll_cartridge"] <= detail["nll_init"]
    versions = json.loads(run_cli("versions", "sample", "--json", env_home=cartridge_home).stdout)["versions"]
    assert versions[-1]["heldout"] == doc["heldout"]
    plain = run_cli("versions", "sample", env_home=cartridge_home).stdout
    assert "held-out" in plain


# -- the corpus-wide teacher ------------------------------------------------------------------------

def test_teacher_sees_the_whole_corpus_or_a_window_around_the_chunk():
    from engine.corpus.chunks import ChunkSampler, Document
    from engine.engines.models import context_system_prompt
    from engine.selfstudy.prompts import chunk_system_prompt

    docs = [Document(f"n{i}.md", f"{i:064d}", f"Note {i}. " + " ".join(f"word{i}x{j}" for j in range(300)))
            for i in range(6)]
    sampler = ChunkSampler(docs)
    chunks = sampler.sample_many(12, 64, seed=1)
    whole = sampler.with_teacher_context(chunks, sampler.n_tokens + 10)
    assert all(chunk_system_prompt(c) == context_system_prompt(sampler.text) for c in whole)
    assert all(c.files == [d.path for d in docs] for c in whole)  # the answer may use any file

    budget = sampler.n_tokens // 3
    windowed = sampler.with_teacher_context(sampler.sample_many(12, 64, seed=2), budget)
    starts = [w[0] for w in sampler.teacher_windows(budget)]
    order = [starts.index(next(s for s, e in sampler.teacher_windows(budget) if c.context_tokens and
                               sampler.span(s, e - s).text == c.context)) for c in windowed]
    assert order == sorted(order)  # grouped by window, so each window's prompt is evaluated once
    for c in windowed:
        assert c.text.split("\n", 1)[-1][:40] in c.context and c.context_tokens <= budget


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    from engine.training.distill import lr_factor

    cfg = TrainConfig(lr_schedule="cosine", warmup=0.1)
    factors = [lr_factor(cfg, step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # never rises after the warm-up
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    assert lr_factor(TrainConfig(), 50, 100) == 1.0


def test_spread_initialisation_draws_from_across_the_corpus():
    from engine.cartridge.format import corpus_init_text
    from engine.corpus.chunks import ChunkSampler, Document

    docs = [Document(f"n{i}.md", f"{i:064d}", f"Note {i}. " + " ".join(f"word{i}x{j}" for j in range(200)))
            for i in range(5)]
    sampler = ChunkSampler(docs)
    spread, first = corpus_init_text(sampler, 64, "spread"), corpus_init_text(sampler, 64, "first")
    assert "Note 0" in spread and "word4x" in spread and "word4x" not in first
    with pytest.raises(Exception, match="unknown cartridge initialisation"):
        corpus_init_text(sampler, 64, "middle")


def test_spread_excerpts_fit_the_cartridge():
    """The excerpts are sized so the chat-templated text fits p: the last excerpt is not cut away."""
    from engine.cartridge.format import corpus_init_text
    from engine.corpus.chunks import ChunkSampler, Document
    from engine.engines.models import chat_ids

    lm = shared_tiny_lm()
    docs = [Document(f"n{i}.md", f"{i:064d}", f"Note {i}. " + " ".join(f"word{i}x{j}" for j in range(300)))
            for i in range(6)]
    for p in (64, 256):
        text = corpus_init_text(ChunkSampler(docs), p, "spread")
        assert len(chat_ids(lm.tokenizer, [{"role": "system", "content": text}], add_generation_prompt=False)) <= p
        assert "word5x" in text


def test_attention_scores_are_what_eager_attention_weights_sum_to(monkeypatch):
    """The chunked scores equal the column sums of the full attention matrices the model's eager attention
    returns, chunk edges included."""
    from engine.cartridge import kv_select

    lm = shared_tiny_lm()
    ids = kv_select.corpus_ids(lm, "The ferry leaves at nine from pier four, the bus at ten. " * 3)
    monkeypatch.setattr(kv_select, "QUERY_CHUNK", 7)
    scores, _ = kv_select.attention_scores(lm, ids)
    configs = {id(c): c for c in [lm.model.config] + [l.self_attn.config for l in lm.model.model.layers]}.values()
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        with torch.no_grad():
            attentions = lm.model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    finally:
        for c, name in zip(configs, before):
            c._attn_implementation = name
    groups = lm.model.config.num_attention_heads // lm.n_kv_heads
    assert len(ids) > 3 * 7 and len(scores) == len(attentions) == lm.n_layers
    for got, weights in zip(scores, attentions):
        want = weights[0].float().sum(1).view(lm.n_kv_heads, groups, -1).sum(1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_attention_initialisation_keeps_each_heads_most_attended_positions():
    from engine.cartridge.format import init_embeddings, prefix_embeddings
    from engine.corpus.chunks import ChunkSampler, Document
    from engine.cartridge.kv_select import attention_selected, corpus_ids, rerotate

    lm = shared_tiny_lm()
    sampler = ChunkSampler([Document("log.md", "0" * 64, "The ferry leaves at nine from pier four. " * 12)])
    ids = corpus_ids(lm, sampler.text)
    whole = prefix_embeddings(lm, ids)
    # Every position kept: nothing moves, so it is the corpus's own KV.
    torch.testing.assert_close(attention_selected(lm, sampler, len(ids)), whole, atol=1e-4, rtol=1e-4)
    p = 24
    picked = attention_selected(lm, sampler, p)
    assert picked.shape == (p, whole.shape[1])
    torch.testing.assert_close(picked[0], whole[0], atol=1e-4, rtol=1e-4)  # the sink stays first
    # Values are the corpus's own, per head, in corpus order; keys are rotated to positions 0..p-1.
    packed = picked.view(p, lm.n_layers, 2, lm.n_kv_heads, lm.head_dim)
    full = whole.view(len(ids), lm.n_layers, 2, lm.n_kv_heads, lm.head_dim)
    inv_freq = lm.model.model.rotary_emb.inv_freq.float()
    for layer in range(1, lm.n_layers):  # (layer 0's values depend on the token alone: repeats are ambiguous)
        for head in range(lm.n_kv_heads):
            rows = [int((full[:, layer, 1, head] - v).abs().sum(-1).argmin()) for v in packed[:, layer, 1, head]]
            assert rows == sorted(rows) and len(set(rows)) == p
            back = rerotate(packed[:, layer, 0, head], torch.arange(p), torch.tensor(rows), inv_freq)
            torch.testing.assert_close(back, full[rows, layer, 0, head], atol=1e-4, rtol=1e-4)
    assert attention_selected(lm, sampler, len(ids) + 1) is None  # shorter than p: nothing to select
    torch.testing.assert_close(init_embeddings(lm, sampler, p, "attention"), picked)


def test_a_corpus_beyond_the_context_starts_from_its_windows_most_attended_positions():
    """Longer than the model's context, the corpus is read in equal windows that fit it. Each window gives its
    share of p, in reading order: its most attended positions per KV head, keys rotated to their place in the
    cartridge. The first window keeps the attention sink, the later ones never their copy of the prompt's
    opening."""
    import dataclasses

    from engine.cartridge.format import init_embeddings, prefix_embeddings
    from engine.cartridge.kv_select import (corpus_ids, fits, read_windows, rerotate, template_prefix,
                                            windowed_attention_selected, windows)
    from engine.corpus.chunks import ChunkSampler, Document

    assert windows(10, 4) == [(0, 3), (3, 7), (7, 10)] and windows(8, 4) == [(0, 4), (4, 8)]
    assert windows(3, 4) == [(0, 3)]
    lm = dataclasses.replace(shared_tiny_lm(), max_positions=384)
    sampler = ChunkSampler([Document("ferry.md", "0" * 64, "The ferry leaves at nine from pier four. " * 30),
                            Document("bus.md", "1" * 64, "The night bus stops at the mill at ten past one. " * 30)])
    assert not fits(lm, len(corpus_ids(lm, sampler.text)))
    p, skip = 30, template_prefix(lm)
    ranges = windows(sampler.n_tokens, lm.max_positions - 256)
    assert len(ranges) >= 3 and ranges[0][0] == 0 and ranges[-1][1] == sampler.n_tokens
    picked = windowed_attention_selected(lm, sampler, p)
    assert picked.shape[0] == p
    torch.testing.assert_close(init_embeddings(lm, sampler, p, "attention"), picked)
    inv_freq = lm.model.model.rotary_emb.inv_freq.float()

    def check(picked, read):  # each window in `read` gave its share of p, in order
        packed = picked.view(p, lm.n_layers, 2, lm.n_kv_heads, lm.head_dim)
        bounds = [round(i * p / len(read)) for i in range(len(read) + 1)]
        for index, (lo, hi) in enumerate(read):
            ids = corpus_ids(lm, sampler.span(lo, hi - lo).text)
            assert len(ids) <= lm.max_positions
            whole = prefix_embeddings(lm, ids)
            full = whole.view(len(ids), lm.n_layers, 2, lm.n_kv_heads, lm.head_dim)
            block = packed[bounds[index]:bounds[index + 1]]
            if index == 0:
                torch.testing.assert_close(picked[0], whole[0], atol=1e-4, rtol=1e-4)  # the sink stays first
            places = torch.arange(bounds[index], bounds[index + 1])
            for layer in range(1, lm.n_layers):
                for head in range(lm.n_kv_heads):
                    rows = [int((full[:, layer, 1, head] - v).abs().sum(-1).argmin()) for v in block[:, layer, 1, head]]
                    assert rows == sorted(rows) and len(set(rows)) == len(rows)
                    assert index == 0 or min(rows) >= skip
                    back = rerotate(block[:, layer, 0, head], places, torch.tensor(rows), inv_freq)
                    torch.testing.assert_close(back, full[rows, layer, 0, head], atol=1e-4, rtol=1e-4)

    check(picked, ranges)
    # Beyond `most` windows, `most` of them are read, evenly spaced, the first and the last among them.
    assert read_windows(10, 1, 4) == [(0, 1), (3, 4), (6, 7), (9, 10)] and read_windows(10, 4, 3) == windows(10, 4)
    assert read_windows(sampler.n_tokens, lm.max_positions - 256, 2) == [ranges[0], ranges[-1]]
    check(windowed_attention_selected(lm, sampler, p, most=2), [ranges[0], ranges[-1]])
