"""The benchmark scripts run end to end on the real model and print the figures they promise (tiny sizes)."""

import json
import math
import os
import subprocess
import sys

from conftest import ASSETS, ROOT, TINY_TRAIN, run_cli


def run_benchmark(script: str, *args: str, home) -> dict:
    env = {**os.environ, "CARTRIDGE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_bench_modes(cartridge_home):
    assert run_cli("ingest", str(ASSETS / "sample"), env_home=cartridge_home).returncode == 0
    assert run_cli("train", "sample", *TINY_TRAIN, env_home=cartridge_home).returncode == 0
    doc = run_benchmark("bench_modes.py", "sample", "--engine", "torch", "--new-tokens", "3", "--repeats", "1",
                        home=cartridge_home)
    modes = doc["modes"]
    assert list(modes) == ["none", "icl", "cartridge"] and doc["engine"] == "torch"
    assert all(m["ttft_s"] > 0 and m["decode_tok_s"] > 0 for m in modes.values())
    assert modes["none"]["kv_bytes"] < modes["cartridge"]["kv_bytes"] < modes["icl"]["kv_bytes"]
    assert doc["ratios"]["kv_icl_over_cartridge"] == modes["icl"]["kv_bytes"] / modes["cartridge"]["kv_bytes"]
    assert doc["targets_met"]["kv_le_1_8_of_icl"]  # 16 virtual tokens against a ~5,000-token corpus


def test_bench_synthesis(cartridge_home):
    doc = run_benchmark("bench_synthesis.py", "--conversations", "2", "--chunk-tokens", "128", "--answer-tokens", "24",
                        home=cartridge_home)
    assert set(doc["backends"]) == {"llamacpp", "torch"}
    for figures in doc["backends"].values():
        assert figures["conversations"] == 2 and figures["per_min"] > 0 and figures["mean_answer_tokens"] > 0


def test_bench_quality_and_bench_decoding(tmp_path, cartridge_home):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join((ASSETS / "sample_qa.jsonl").read_text().splitlines()[:2]) + "\n")
    home = tmp_path / "bench-home"
    setting = "tiny: p=16 conversations=4 steps=2 chunk_tokens=96 batch_size=2 max_answer_tokens=16 init=spread"
    answers = tmp_path / "answers.jsonl"
    doc = run_benchmark("bench_quality.py", str(ASSETS / "sample"), "--qa", str(qa), "--setting", setting,
                        "--home", str(home), "--answers", str(answers), home=cartridge_home)
    [row] = doc["rows"]
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    assert sorted((a["mode"], a["question"]) for a in written) == sorted(
        (m, json.loads(line)["question"]) for m in row["accuracy"] for line in qa.read_text().splitlines())
    for mode, share in row["accuracy"].items():  # every generated answer, as scored
        assert sum(a["correct"] for a in written if a["mode"] == mode) / 2 == share
    assert row["setting"] == "tiny" and row["overrides"]["p"] == 16 and row["synth"] and row["steps"] == 2
    assert set(row["nll"]) == set(row["accuracy"]) == {"none", "icl", "init", "cartridge"}
    assert row["nll"]["icl"] < row["nll"]["none"] and row["recovered"] is not None
    decoding = run_benchmark("bench_decoding.py", "sample", "--qa", str(qa), "--ngrams", "0,4", "--modes", "cartridge",
                             home=home)
    assert [r["no_repeat_ngram"] for r in decoding["rows"]] == [0, 4]
    assert all(0 <= r["modes"]["cartridge"]["accuracy"] <= 1 for r in decoding["rows"])


def test_bench_scale(cartridge_home):
    doc = run_benchmark("bench_scale.py", "--files", "600", "--tokens", "12000", "--per-folder", "50",
                        home=cartridge_home)
    phases = {p["phase"]: p for p in doc["phases"]}
    assert list(phases) == ["generate", "ingest", "rescan unchanged", "start of training"]
    assert phases["ingest"]["files"] >= 600 and phases["ingest"]["files_per_s"] > 0
    assert phases["rescan unchanged"]["changed"] is False and phases["rescan unchanged"]["registry_rows_written"] == 0
    start = phases["start of training"]
    assert start["chunks"] == min(256, max(48, math.ceil(start["corpus_tokens"] * 8 / 1000)))  # quick's scaling
    assert start["files_studied"] == start["chunks"]  # more files than chunks: each chunk a different file
    assert doc["peak_rss_mb"] > 0


def test_bench_init(tmp_path, cartridge_home):
    folder = tmp_path / "harbour"
    folder.mkdir()
    (folder / "notes.md").write_text("The ferry to the island leaves at nine from pier four. Tickets cost three "
                                     "euros and are sold on board. The harbour office opens at eight.\n" * 3)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "When does the ferry leave?", "answer": "The ferry leaves at nine.",
                              "expect": ["nine"]}) + "\n")
    doc = run_benchmark("bench_init.py", str(folder), "--qa", str(qa), "--p", "16,32", "--accuracy", home=cartridge_home)
    assert [(r["p"], r["init"]) for r in doc["rows"]] == [(p, how) for p in (16, 32)
                                                           for how in ("first", "spread", "attention")]
    assert doc["icl"]["nll"] < doc["none"]["nll"]
    assert all(math.isfinite(r["nll"]) and 0 <= r["accuracy"] <= 1 and r["recovered"] is not None for r in doc["rows"])
    # Beyond the model's context there is no icl figure: the starts are still scored.
    (folder / "log.md").write_text("Buoy 7 drifted north of the breakwater after the storm. " * 900)
    doc = run_benchmark("bench_init.py", str(folder), "--qa", str(qa), "--p", "16", "--inits", "spread",
                        home=cartridge_home)
    assert doc["tokens"] > 8192 and doc["icl"] is None
    assert [(r["init"], r["recovered"]) for r in doc["rows"]] == [("spread", None)] and math.isfinite(doc["rows"][0]["nll"])


def test_bench_bigfolder(tmp_path, cartridge_home):
    """A folder beyond the context (the sample repeated), tiny training: every mode but icl is reported."""
    folder = tmp_path / "big"
    for i in range(2):  # ~10k tokens, more than the model's 8,192
        for path in sorted((ASSETS / "sample").glob("*.md")):
            (folder / f"copy{i}").mkdir(parents=True, exist_ok=True)
            (folder / f"copy{i}" / path.name).write_text(path.read_text())
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join((ASSETS / "sample_qa.jsonl").read_text().splitlines()[:2]) + "\n")
    doc = run_benchmark("bench_bigfolder.py", str(folder), "--qa", str(qa), "--setting",
                        "p=48 conversations=4 steps=2 chunk_tokens=96 batch_size=2 max_answer_tokens=16 init=spread",
                        "--home", str(tmp_path / "bench-home"), home=cartridge_home)
    assert doc["corpus_tokens"] > 8192 and doc["p"] == 48 and doc["questions"] == 2
    assert list(doc["modes"]) == ["none", "rag", "init", "cartridge", "cartridge+rag", "rag 2p"]
    for m in doc["modes"].values():
        assert math.isfinite(m["nll"]) and 0 <= m["accuracy"] <= 1 and m["kv_bytes"] > 0 and m["ttft_s"] > 0
    assert doc["modes"]["none"]["kv_bytes"] < doc["modes"]["cartridge"]["kv_bytes"]
    assert doc["modes"]["rag"]["kv_bytes"] < doc["modes"]["rag 2p"]["kv_bytes"]  # twice the retrieved tokens
    assert set(doc["targets"]) == {"cartridge+rag beats rag", "cartridge+rag beats rag 2p", "cartridge beats none"}


def test_bench_retrieval(tmp_path, cartridge_home):
    """Whether the retrieved passages hold the expected strings: the sample's first questions at two budgets."""
    qa = tmp_path / "qa.jsonl"
    lines = (ASSETS / "sample_qa.jsonl").read_text().splitlines()[:4]
    qa.write_text("\n".join(lines) + "\n" + json.dumps({"question": "Who wrote the folder?", "answer": "Nobody says.",
                                                         "expect": ["a string the sample never holds"]}) + "\n")
    doc = run_benchmark("bench_retrieval.py", str(ASSETS / "sample"), "--qa", str(qa), "--tokens", "16,576",
                        "--home", str(tmp_path / "bench-home"), home=cartridge_home)
    small, large = doc["rows"]
    assert (small["tokens"], large["tokens"]) == (16, 576) and small["questions"] == large["questions"] == 5
    assert small["found"] < large["found"] <= 4  # a budget of 16 tokens holds almost nothing
    assert not large["detail"][-1]["found"] and all(d["sources"] for d in large["detail"][:4])

    qa.write_text(lines[0] + "\nnot json\n")  # a bad QA file: one line naming it, exit status 2, no traceback
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_retrieval.py"), str(ASSETS / "sample"),
                           "--qa", str(qa), "--home", str(tmp_path / "bench-home")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {qa}:2: expected {{\"question\": ..., \"answer\": ...}}"
