"""Retrieval: passages indexed in the registry's FTS5 table, found by BM25, within budget, with sources."""

from __future__ import annotations

import json

from conftest import TINY_TRAIN, run_cli, write
from engine.store import registry
from engine.corpus.ingest import ingest
from engine.corpus.retrieval import RAG_SYSTEM_PROMPT, retrieve, search, split_passages
from engine.engines.tokenizer import load_tokenizer

BOATS = ("# Boats\n\nThe club's dinghy is moored at pontoon C, berth 14.\n"
         + "Members book the dinghy through the harbour office.\n" * 3)
RAG_INTRO = RAG_SYSTEM_PROMPT.format(excerpts="")
GARDEN = "# Garden\n\n" + "The allotment shed keeps spades, rakes and twine for the spring.\n" * 30


def count(text: str) -> int:
    return len(load_tokenizer(None)(text, add_special_tokens=False)["input_ids"])


def test_passages_are_indexed_once_and_found_by_bm25(tmp_path, db):
    root = tmp_path / "club"
    write(root, "boats.md", BOATS)
    write(root, "garden.md", GARDEN)
    v1 = ingest(root, db=db).version
    found = search(db, v1, "Where is the dinghy moored?")
    assert found and found[0].path == "boats.md" and found[0].start_line == 1
    assert "pontoon C" in found[0].text
    indexed = db["passages"].count
    assert indexed == len(split_passages(BOATS)) + len(split_passages(GARDEN))

    write(root, "boats.md", BOATS.replace("berth 14", "berth 15"))
    v2 = ingest(root, db=db).version
    assert db["passages"].count == indexed + len(split_passages(BOATS))  # the unchanged garden is not re-indexed
    assert "berth 15" in search(db, v2, "dinghy berth")[0].text
    assert "berth 14" in search(db, v1, "dinghy berth")[0].text  # each version finds its own text
    assert search(db, v2, "what is it?") == []  # stop words only: nothing to look for
    assert search(db, v2, 'dinghy" OR * NEAR(') is not None  # FTS5 syntax in a question is harmless

    corpus = registry.get_corpus(db, "club")
    registry.delete_corpus(db, corpus["id"])
    assert db["passages"].count == 0 and db.execute("SELECT count(*) FROM passages_fts").fetchone()[0] == 0


def test_retrieved_passages_fit_the_budget_and_chat_shows_sources(tmp_path, cartridge_home):
    root = tmp_path / "club"
    write(root, "boats.md", BOATS)
    write(root, "garden.md", GARDEN)
    assert run_cli("ingest", str(root), env_home=cartridge_home).returncode == 0
    db = registry.open_registry()
    version = registry.latest_version(db, registry.get_corpus(db, "club")["id"])
    for budget in (40, 120, 400):
        chosen = retrieve(db, [version], "Which spades and rakes does the shed keep for the dinghy?", budget, count)
        assert chosen and sum(count(f"[{p.label()}]\n{p.text.rstrip()}\n\n") for p in chosen) <= budget

    proc = run_cli("chat", "club", "--mode", "rag", "--rag-tokens", "120", "--prompt", "Where is the dinghy moored?",
                   "--max-tokens", "24", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["mode"] == "rag" and reply["sources"][0] == {"path": "boats.md", "lines": [1, 6]}
    proc = run_cli("chat", "club", "--mode", "rag", "--prompt", "Where is the dinghy moored?", "--max-tokens", "8",
                   env_home=cartridge_home)
    assert proc.returncode == 0 and "[sources: boats.md:1-6" in proc.stderr
    proc = run_cli("chat", "club", "--mode", "cartridge+rag", "--prompt", "hi", env_home=cartridge_home)
    assert proc.returncode == 2 and "no trained cartridge yet" in proc.stderr


def test_the_best_passage_comes_last_nearest_the_question(tmp_path, db):
    """The prompt lists the passages from the least to the most relevant, so the best one sits right before the
    question; the sources a reply shows stay best first."""
    from engine.corpus.retrieval import excerpt, rag_prompt

    root = tmp_path / "club"
    write(root, "boats.md", BOATS)
    write(root, "garden.md", GARDEN)
    version = ingest(root, db=db).version
    question = "Where is the dinghy moored, and does the shed keep spades?"
    prompt, passages = rag_prompt(db, [version], question, 400, load_tokenizer(None))
    assert len(passages) >= 2 and passages == retrieve(db, [version], question, 400, count)
    assert passages[0].path == "boats.md"  # the best match first among the sources
    assert prompt == RAG_SYSTEM_PROMPT.format(excerpts="".join(excerpt(p) for p in reversed(passages)).rstrip())
    assert prompt.rstrip().endswith(passages[0].text.rstrip())


def test_a_corpus_beyond_the_context_skips_icl_and_reports_the_rest(tmp_path, cartridge_home):
    root = tmp_path / "big"
    for i in range(12):
        write(root, f"log{i:02}.md", "".join(f"Entry {i}.{j}: crate {i * 100 + j} left the quay on tide {j}.\n"
                                              for j in range(60)))
    write(root, "ferry.md", "The night ferry to Skerra leaves at 23:40 from the north quay.\n")
    assert run_cli("ingest", str(root), env_home=cartridge_home).returncode == 0
    qa = write(tmp_path, "qa.jsonl", json.dumps({"question": "When does the night ferry to Skerra leave?",
                                                 "answer": "It leaves at 23:40.", "expect": ["23:40"]}) + "\n")
    proc = run_cli("eval", "big", "--qa", str(qa), "--modes", "none,icl,rag", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert list(result["modes"]) == ["none", "rag"] and "does not fit" in result["skipped"]["icl"]
    assert result["modes"]["rag"]["nll"] < result["modes"]["none"]["nll"]  # the passage helps

    proc = run_cli("chat", "big", "--mode", "icl", "--prompt", "hi", env_home=cartridge_home)
    assert proc.returncode == 2 and "does not fit the model's context" in proc.stderr
    assert proc.stderr.count("\n") == 1

    # auto, chat's default, answers a folder beyond the context with its cartridge and the passages, and says so
    assert run_cli("train", "big", *TINY_TRAIN, env_home=cartridge_home).returncode == 0
    proc = run_cli("chat", "big", "--prompt", "When does the night ferry to Skerra leave?", "--max-tokens", "8",
                   "--rag-tokens", "120", env_home=cartridge_home)  # the tiny cartridge's p=16 holds no passage
    assert proc.returncode == 0, proc.stderr
    assert "cartridge+rag: a folder longer than the model's context" in proc.stderr
    assert "[cartridge+rag, first token" in proc.stderr and "[sources: ferry.md:1-1" in proc.stderr
    from app.ui_chat import cartridge_card

    assert "Longer than the model's context: *Auto*" in cartridge_card(["big"], None)


class Template:
    """The bundled tokenizer rendering another chat template."""

    def __init__(self, template: str):
        self.template, self.tokenizer = template, load_tokenizer(None)

    def apply_chat_template(self, messages, tokenize=False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template, **kwargs)


def test_passages_after_a_cartridge_keep_the_system_turn_it_was_trained_behind():
    """Training puts the template's default system turn right behind the cartridge, so cartridge+rag keeps that turn
    first and adds the passages' turn after it; rag alone has the passages' turn only. Templates without a default
    system turn, or that refuse a second one, get the passages' turn alone."""
    from engine.engines.models import default_system_prompt, passages_messages

    tok = load_tokenizer(None)
    question = [{"role": "user", "content": "Where is the dinghy moored?"}]
    render = lambda t, messages: t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    trained = render(tok, question)  # what training puts behind the cartridge
    opening = trained[: trained.index("<|im_start|>user")]
    assert default_system_prompt(tok) in opening and "SmolLM" in opening

    old_system = [{"role": "system", "content": "an earlier system turn"}]
    after = render(tok, passages_messages(tok, "PIER NOTES", old_system + question, after_cartridge=True))
    assert after.startswith(opening) and after.endswith(trained[len(opening):])
    assert after[len(opening):].startswith("<|im_start|>system\nPIER NOTES<|im_end|>")
    alone = render(tok, passages_messages(tok, "PIER NOTES", old_system + question, after_cartridge=False))
    assert alone == "<|im_start|>system\nPIER NOTES<|im_end|>\n" + trained[len(opening):]
    assert "earlier" not in after + alone

    turns = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    no_default = Template(turns)
    refuses_second = Template("{% if messages[0]['role'] != 'system' %}<system>Be brief.</system>{% endif %}"
                              "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                              "{{ raise_exception('one system turn only') }}{% endif %}"
                              "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}")
    no_system = Template("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}{{ m['content'] }}{% endfor %}")
    assert default_system_prompt(no_default) is None and default_system_prompt(no_system) is None
    assert default_system_prompt(refuses_second) == "Be brief."
    passages_only = [{"role": "system", "content": "PIER NOTES"}] + question
    for template in (no_default, refuses_second, no_system):
        assert passages_messages(template, "PIER NOTES", question, after_cartridge=True) == passages_only


def test_chat_and_eval_put_the_passages_after_a_cartridge_as_training_does(tmp_path, db):
    """The wiring of the layout above: chat's and eval's cartridge+rag prompts keep the default system turn before
    the passages; their rag prompts do not."""
    from dataclasses import replace

    import torch

    from engine.cartridge.format import kv_width
    from engine.engines.models import load_model
    from engine.engines.torch_engine import TorchEngine
    from engine.serve.evaluate import Scorer
    from engine.serve.inference import Chat, resolve

    root = tmp_path / "club"
    write(root, "boats.md", BOATS)
    ingest(root, db=db)
    lm = load_model(None, "cpu")
    engine = TorchEngine(lm)
    question = "Where is the dinghy moored?"
    rag = resolve(db, ["club"], mode="rag", rag_tokens=120)
    for mode, after_cartridge in (("rag", False), ("cartridge+rag", True)):
        chat = Chat(db, replace(rag, mode=mode), engine, lm.tokenizer)
        prompt = lm.tokenizer.decode(chat.prompt_ids([{"role": "user", "content": question}]))
        assert "pontoon C" in prompt and ("SmolLM" in prompt) == after_cartridge
        if after_cartridge:
            assert prompt.index("SmolLM") < prompt.index("pontoon C") < prompt.index(question)

    context = lambda q: "PIER NOTES"  # noqa: E731
    alone = Scorer(engine, lm.tokenizer, context=context).messages(question)
    after = Scorer(engine, lm.tokenizer, context=context, embeddings=torch.zeros(4, kv_width(lm))).messages(question)
    assert [m["content"] for m in alone] == ["PIER NOTES", question]
    assert "SmolLM" in after[0]["content"] and [m["content"] for m in after[1:]] == ["PIER NOTES", question]


def test_training_with_retrieved_passages_uses_its_own_folder_only(tmp_path, db):
    """cartridge+rag trains with the passages chat would add: a seeded share of the conversations gets them in
    the student's prompt, found in the run's own version only (never another folder's text)."""
    import numpy as np

    from engine.engines.models import load_model
    from engine.selfstudy.conversations import Conversation
    from engine.training import pipeline
    from engine.training.distill import _example

    club, other = tmp_path / "club", tmp_path / "other"
    write(club, "boats.md", BOATS)
    write(club, "garden.md", GARDEN)
    write(other, "secret.md", "The dinghy key hides under the blue flowerpot by the harbour office.\n")
    ingest(other, db=db)
    version = ingest(club, db=db).version
    convs = [Conversation(user=f"Where is the dinghy moored, question {i}?", answer_ids=[11, 12, 13],
                          topk_ids=np.full((3, 2), 5), topk_logprobs=np.zeros((3, 2))) for i in range(8)]
    cfg = pipeline.make_config("quick", p=120, rag=0.5)
    tokenizer = load_tokenizer(None)
    out = pipeline.with_passages(db, version, convs, cfg, tokenizer)
    with_context = [c for c in out if c.context]
    assert len(with_context) == 4 and all("pontoon C" in c.context for c in with_context)
    assert not any("flowerpot" in c.context for c in out)  # the other folder's words never reach this one
    assert all(count(c.context) <= cfg.p + count(RAG_INTRO) for c in with_context)
    again = pipeline.with_passages(db, version, convs, cfg, tokenizer)  # the same share for the same seed
    assert [c.context for c in again] == [c.context for c in out]

    lm = load_model(None, "cpu")
    plain, rag = _example(lm, convs[0], cfg, cfg.p), _example(lm, with_context[0], cfg, cfg.p)
    assert len(rag.ids) > len(plain.ids) + 20 and rag.ids[-2:] == plain.ids[-2:] == [11, 12]
    assert [rag.ids[i + 1] for i in rag.positions[:-1]] == [11, 12]  # the answer is still what is supervised
    student = tokenizer.decode(rag.ids)  # the passages come after the system turn chat keeps behind the cartridge
    assert student.index("SmolLM") < student.index("pontoon C") < student.index("Where is the dinghy")

    trained = pipeline.train(db, "club", p=16, conversations=8, steps=None, epochs=1.0, batch_size=2, chunk_tokens=96,
                             max_answer_tokens=16, max_user_tokens=48, init="spread", heldout=0.0, rag=0.5)
    assert registry.get_version(db, registry.get_corpus(db, "club"), trained.version)["status"] == "ready"


def test_a_cached_chat_never_answers_from_a_folder_that_gave_up_its_name(tmp_path, db):
    """The UI keeps loaded chats; after `club` is renamed and another folder takes the name, a chat with
    `club` retrieves from the new folder, not from the one cached under that name."""
    from app.ui_chat import ChatBackends

    write(tmp_path / "club", "boats.md", BOATS)
    write(tmp_path / "other", "garden.md", GARDEN)
    ingest(tmp_path / "club", db=db)
    backends = ChatBackends()
    question = [{"role": "user", "content": "Which spades does the shed keep, and where is the dinghy?"}]
    first = backends.get(["club"], None, "rag")
    assert [s["path"] for s in first.reply(question, max_new_tokens=2).sources] == ["boats.md"]
    registry.rename_corpus(db, "club", "old")  # as the CLI does: the running UI is not told
    ingest(tmp_path / "other", name="club", db=db)
    again = backends.get(["club"], None, "rag")
    assert again is not first
    assert [s["path"] for s in again.reply(question, max_new_tokens=2).sources] == ["garden.md"]
