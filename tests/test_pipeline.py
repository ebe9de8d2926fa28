"""End to end on the real default model with tiny settings: ingest -> train -> chat -> eval, via the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ASSETS, ROOT, TINY_TRAIN, run_cli, write
from engine.store import registry


@pytest.fixture
def trained(tmp_path, cartridge_home):
    """The sample corpus ingested and trained with tiny settings (shared shape for several checks)."""
    proc = run_cli("ingest", str(ASSETS / "sample"), "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train", "sample", *TINY_TRAIN, "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_train_chat_eval_and_refusals(trained, tmp_path, cartridge_home):
    doc = trained
    assert doc["corpus"] == "sample" and doc["version"] == 1 and doc["tokens"] == 16
    assert doc["conversations"] == 4 and doc["steps"] == 2
    assert doc["loss_first"] > 0 and doc["loss_last"] > 0 and doc["seconds"] > 0
    assert doc["engines"] == {"synthesis": "llama.cpp", "training": "torch", "device": "cpu", "processes": 1}
    folder = doc["cartridge"]
    meta = json.loads(open(os.path.join(folder, "cartridge.json")).read())
    assert meta["p"] == 16 and meta["version"] == 1 and meta["fingerprint"].startswith("SmolLM2")
    assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in os.listdir(folder))

    db = registry.open_registry()
    corpus = registry.get_corpus(db, "sample")
    assert corpus["current_version"] == 1
    assert registry.get_version(db, corpus)["status"] == "ready"
    run = registry.list_runs(db, corpus["id"])[-1]
    assert run["status"] == "done"
    assert [m["step"] for m in registry.run_metrics(db, run["id"], "training")] == [1, 2]

    proc = run_cli("chat", "sample", "--prompt", "When is the workshop closed?", "--max-tokens", "12", "--json",
                   env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["mode"] == "cartridge" and reply["cartridges"] == [folder]
    assert reply["answer"].strip() and reply["ttft_s"] > 0 and reply["kv_bytes"] > 0

    qa = write(tmp_path, "qa.jsonl", "\n".join(open(ASSETS / "sample_qa.jsonl").read().splitlines()[:2]) + "\n")
    proc = run_cli("eval", "sample", "--qa", str(qa), "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["modes"]) == {"none", "icl", "cartridge"}
    assert result["modes"]["icl"]["nll"] < result["modes"]["none"]["nll"]  # the corpus in context helps
    assert result["modes"]["cartridge"]["kv_bytes"] < result["modes"]["icl"]["kv_bytes"] / 8
    assert result["recovered"] is not None
    # The untrained cartridge (same size) scores differently from the trained one: training changed it.
    proc = run_cli("eval", "sample", "--qa", str(qa), "--modes", "init,cartridge", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    modes = json.loads(proc.stdout)["modes"]
    assert list(modes) == ["init", "cartridge"] and modes["init"]["kv_bytes"] == modes["cartridge"]["kv_bytes"]
    assert modes["init"]["per_question"] != modes["cartridge"]["per_question"]

    # A cartridge made for another model is refused with one line and exit 2.
    meta["fingerprint"] = "other-model.gguf@sha256:" + "0" * 64
    with open(os.path.join(folder, "cartridge.json"), "w") as fh:
        json.dump(meta, fh)
    proc = run_cli("chat", "sample", "--prompt", "hi", "--json", env_home=cartridge_home)
    assert proc.returncode == 2 and "was made for model other-model.gguf" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_composed_chat_over_two_corpora(trained, tmp_path, cartridge_home):
    other = tmp_path / "other"
    write(other, "tides.md", "The Harbour Office posts the tide table every Sunday at noon.\n" * 20)
    assert run_cli("ingest", str(other), env_home=cartridge_home).returncode == 0
    proc = run_cli("train", "other", *TINY_TRAIN, "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("chat", "sample", "other", "--prompt", "Hello", "--max-tokens", "8", "--json",
                   env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert len(reply["cartridges"]) == 2
    # Composed length: 16 + 16 - 1 tokens (one sink kept); KV covers it plus the prompt.
    from engine.cartridge.format import kv_width
    from engine.engines.models import load_model
    assert reply["kv_bytes"] >= 31 * kv_width(load_model()) * 2


def test_serving_follows_retrains_and_refuses_broken_cartridges(trained, tmp_path, cartridge_home):
    """A retrain of the same version number reaches a running chat; an older version retrained does not
    take over; the serving folder is never replaced in place; NaN weights are refused on both engines."""
    from app.ui_chat import ChatBackends

    backends = ChatBackends()
    first = backends.get(["sample"], None, "cartridge")
    assert backends.get(["sample"], None, "cartridge") is first  # cached while nothing changed

    proc = run_cli("train", "sample", *TINY_TRAIN, "--seed", "1", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["version"] == 1 and again["current"] is True
    assert again["cartridge"] != trained["cartridge"] and not os.path.exists(trained["cartridge"])
    assert backends.get(["sample"], None, "cartridge") is not first  # keyed by content, not by version number

    sample = tmp_path / "sample"
    import shutil
    shutil.copytree(ASSETS / "sample", sample)
    db = registry.open_registry()
    registry.update_corpus(db, registry.get_corpus(db, "sample")["id"], root=str(sample.resolve()))  # moved folder
    write(sample, "extra.md", "The bicycle pump lives in the blue cupboard by the back door.\n")
    assert run_cli("ingest", str(sample), "--name", "sample", env_home=cartridge_home).returncode == 0
    assert run_cli("train", "sample", *TINY_TRAIN, env_home=cartridge_home).returncode == 0
    proc = run_cli("train", "sample", "--version", "1", *TINY_TRAIN, "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    older = json.loads(proc.stdout)
    assert older["current"] is False and "older than v2" in older["not_current"]
    assert registry.get_corpus(db, "sample")["current_version"] == 2
    proc = run_cli("versions", "sample", "--make-current", "1", "--json", env_home=cartridge_home)
    assert proc.returncode == 0 and [v["current"] for v in json.loads(proc.stdout)["versions"]] == [True, False]

    from safetensors.torch import load_file, save_file
    weights = os.path.join(older["cartridge"], "adapter_model.safetensors")
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key][3, 5] = float("nan")
    save_file(tensors, weights)
    for engine in ("torch", "llama.cpp"):
        proc = run_cli("chat", "sample", "--engine", engine, "--prompt", "hi", env_home=cartridge_home)
        assert proc.returncode == 2 and "NaN or infinite" in proc.stderr, (engine, proc.stderr)
        assert proc.stderr.count("\n") == 1


def test_icl_and_none_modes(tmp_path, cartridge_home):
    """Neither mode needs a cartridge: a folder that was only ingested answers in both."""
    folder = tmp_path / "ferry"
    write(folder, "times.md", "The ferry to the island leaves at nine from pier four.\n")
    assert run_cli("ingest", str(folder), env_home=cartridge_home).returncode == 0
    for mode in ("icl", "none"):
        proc = run_cli("chat", "ferry", "--mode", mode, "--prompt", "When does the ferry leave?", "--max-tokens", "8",
                       "--json", env_home=cartridge_home)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["mode"] == mode


def test_kill_mid_training_then_resume(tmp_path, cartridge_home):
    assert run_cli("ingest", str(ASSETS / "sample"), env_home=cartridge_home).returncode == 0
    env = {**os.environ, "CARTRIDGE_HOME": str(cartridge_home), "PYTHONPATH": str(ROOT)}
    args = ["--tokens", "16", "--conversations", "4", "--steps", "40", "--chunk-tokens", "96", "--batch-size", "2",
            "--answer-tokens", "24", "--init", "spread"]
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "train", "sample", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    db = registry.open_registry()
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until training steps are being recorded
        rows = list(db["run_metrics"].rows_where("phase = 'training'"))
        if len(rows) >= 12:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # Nothing was current before, so nothing is now; the next start marks the run interrupted.
    from engine.training.pipeline import recover_interrupted
    corpus = registry.get_corpus(db, "sample")
    assert corpus["current_version"] is None
    assert len(recover_interrupted(db)) == 1
    assert registry.list_runs(db)[-1]["status"] == "interrupted"

    proc = run_cli("train", "sample", "--resume", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["steps"] == 40 and doc["conversations"] == 4
    steps = [m["step"] for m in registry.run_metrics(db, doc["run_id"], "training")]
    assert steps[-1] == 40 and min(steps) == 1
    assert registry.get_corpus(db, "sample")["current_version"] == 1


def test_train_bad_input(cartridge_home):
    for args in [("train", "missing"), ("train", "x", "--preset", "huge"), ("chat", "missing", "--prompt", "hi"),
                 ("eval", "missing", "--qa", "nope.jsonl")]:
        proc = run_cli(*args, env_home=cartridge_home)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
