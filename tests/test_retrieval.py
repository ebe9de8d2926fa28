"""Retrieval: passages indexed in the registry's FTS5 table, found by BM25, within budget, with sources."""

from __future__ import annotations

import json

from conftest import run_cli, write
from engine.store import registry
from engine.corpus.ingest import ingest
from engine.corpus.retrieval import retrieve, search, split_passages
from engine.engines.tokenizer import load_tokenizer

BOATS = ("# Boats\n\nThe club's dinghy is moored at pontoon C, berth 14.\n"
         + "Members book the dinghy through the harbour office.\n" * 3)
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
