"""Self-study on an inference server: llama.cpp's own llama-server (`cartridge llama-server`, built from the
sources llama-cpp-python vendors), a real process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ASSETS, ROOT, run_cli, write

TEXT = (ASSETS / "sample" / "safety.md").read_text(encoding="utf-8")[:700]


def start_server(home) -> tuple[str, subprocess.Popen]:
    """`cartridge llama-server` on a free port; returns (url, process)."""
    from app.ports import free_port
    from engine.engines import llama_server

    llama_server.ensure_built(say=print)  # the first run compiles it (minutes), later ones find it
    port = free_port(18480)
    env = {**os.environ, "CARTRIDGE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "llama-server", "--port", str(port), "--parallel", "2",
                                "--ctx", "2048"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    llama_server.wait_until_ready(url, process, timeout=180)
    return url, process


def freeze(process: subprocess.Popen) -> None:
    """Stop the llama-server under `cartridge llama-server` (it keeps accepting connections, answers nothing)."""
    import psutil

    for child in psutil.Process(process.pid).children(recursive=True):
        child.send_signal(signal.SIGSTOP)


def kill(process: subprocess.Popen) -> None:
    import psutil

    for child in psutil.Process(process.pid).children(recursive=True):
        child.kill()
    process.kill()
    process.wait(30)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, process = start_server(tmp_path_factory.mktemp("server-home"))
    yield url
    stop(process)


def test_the_server_teacher_is_the_local_llamacpp_teacher(server):
    """Same greedy answer and the same top-20 log-probabilities (ids and values) as llama.cpp in-process."""
    from engine.engines.decoding import stop_ids
    from engine.engines.llamacpp_worker import LlamaCppProcess
    from engine.engines.models import chat_ids, context_system_prompt
    from engine.engines.server import ServerClient
    from engine.engines.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    client = ServerClient(server)
    assert client.kind == "llama.cpp"
    client.check_tokenizer(tokenizer)
    prompt = chat_ids(tokenizer, [{"role": "system", "content": context_system_prompt(TEXT)},
                                  {"role": "user", "content": "What must you wear in the workshop?"}],
                      add_generation_prompt=True)
    stop = stop_ids(tokenizer)
    served = client.generate(prompt, 40, temperature=0.0, k=20, stop_ids=stop)
    assert served.tokens and served.topk_ids.shape == (len(served.tokens) + served.stopped, 20)

    with LlamaCppProcess(None, n_ctx=2048) as engine:
        local = engine.generate_stats(prompt, 40, 0.0, stop, topk=20)
    # The server evaluates in other batch shapes than the app's worker, and llama.cpp's CPU kernels round
    # differently by batch shape (log-probs differ by ~0.05, at most ~0.2 on this model): the answers agree
    # until a near-tie, and along that common prefix the teacher rows hold the same ids with close values.
    same = next((i for i, (a, b) in enumerate(zip(local.tokens, served.tokens)) if a != b),
                min(len(local.tokens), len(served.tokens)))
    local_ids, local_lp = local.topk_ids, local.topk_logprobs
    gap = np.abs(local_lp[:same, :5] - served.topk_logprobs[:same, :5])
    assert same >= 16
    if same < len(served.tokens):  # where they part, the two best tokens were nearly tied
        assert local_lp[same, 0] - local_lp[same, 1] < 0.25
    assert (local_ids[:same, :3] == served.topk_ids[:same, :3]).mean() > 0.9  # near-ties below the top may swap
    assert gap.mean() < 0.1 and gap[:, 0].max() < 0.3
    assert np.all(np.diff(served.topk_logprobs, axis=1) <= 0) and served.topk_logprobs[:, -1].min() > -30
    client.close()


def test_a_server_with_another_tokenizer_is_refused(server):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.engines.server import ServerClient, ServerError

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "Cartridges:": 1, "files,": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    client = ServerClient(server)
    with pytest.raises(ServerError, match="does not use the training model's tokenizer"):
        client.check_tokenizer(other)
    client.close()


def test_train_on_the_server_survives_a_server_that_stops(tmp_path, cartridge_home):
    """train --synthesis-server: conversations from the server; when it stops answering (frozen: it still
    accepts connections) the run is interrupted within its timeouts, with one clear message, and keeps what
    was made; --resume on a new server finishes it."""
    from engine.store import registry

    folder = tmp_path / "notes"
    write(folder, "safety.md", TEXT)
    assert run_cli("ingest", str(folder), env_home=cartridge_home).returncode == 0
    flags = ["--tokens", "16", "--conversations", "12", "--steps", "2", "--chunk-tokens", "96", "--batch-size", "2",
             "--answer-tokens", "24", "--init", "spread", "--concurrency", "2", "--server-timeout", "15", "--json"]

    url, process = start_server(tmp_path / "server-home")
    env = {**os.environ, "CARTRIDGE_HOME": str(cartridge_home), "PYTHONPATH": str(ROOT)}
    train = subprocess.Popen([sys.executable, "-m", "app.cli", "train", "notes", "--synthesis-server", url, *flags],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    db = registry.open_registry()
    deadline = time.monotonic() + 300
    made = 0
    while made < 3 and train.poll() is None and time.monotonic() < deadline:  # a few conversations, then stop it
        time.sleep(0.2)
        made = db.execute("select count(*) from run_metrics where phase = 'synthesis'").fetchone()[0]
    freeze(process)
    try:
        out, err = train.communicate(timeout=120)  # three tries of 15 s per request, not the default two minutes each
    finally:
        kill(process)
    assert made >= 3 and train.returncode == 2, err
    assert "did not answer" in err and "--resume" in err
    run = registry.list_runs(db, registry.get_corpus(db, "notes")["id"])[-1]
    assert run["status"] == "interrupted"
    from engine.selfstudy.conversations import count_conversations
    from engine.training.pipeline import synth_dir

    corpus = registry.get_corpus(db, "notes")
    assert count_conversations(synth_dir(corpus, 1)) >= 3  # what was made before the stop is kept

    url, process = start_server(tmp_path / "server-home")  # a new server, on another port
    try:
        resumed = run_cli("train", "notes", "--resume", "--synthesis-server", url, "--json", env_home=cartridge_home)
    finally:
        stop(process)
    assert resumed.returncode == 0, resumed.stderr
    outcome = json.loads(resumed.stdout)
    assert outcome["engines"]["synthesis"] == "server"
    assert outcome["engines"]["server"]["kind"] == "llama.cpp" and outcome["engines"]["server"]["url"] == url
    assert outcome["conversations"] >= 10  # 12 made, a tenth kept out to score the cartridge


def test_a_stop_does_not_wait_for_a_server_that_hangs(tmp_path):
    """The user's stop (the UI's Cancel) ends self-study on a frozen server at once, not after the requests
    in flight time out (two minutes each by default)."""
    from engine.corpus.chunks import Chunk
    from engine.engines.server import ServerClient
    from engine.engines.tokenizer import load_tokenizer
    from engine.selfstudy.prompts import load_seed_prompts
    from engine.training.pipeline import SEEDS_DIR
    from engine.selfstudy.server_backend import synthesize_on_server

    url, process = start_server(tmp_path / "server-home")
    client = ServerClient(url)
    tokenizer = load_tokenizer()
    chunks = [Chunk(text=TEXT, files=["safety.md"], file_hashes=["0"], start=0, n_tokens=200, slot=(0, i))
              for i in range(8)]
    stop_at = []
    freeze(process)
    try:
        began = time.monotonic()
        made = list(synthesize_on_server(client, tokenizer, chunks, 8, seeds=load_seed_prompts(SEEDS_DIR), max_answer_tokens=24,
                                         concurrency=2, should_stop=lambda: time.monotonic() - began > 1.0))
        stop_at.append(time.monotonic() - began)
    finally:
        kill(process)
        client.close()
    assert made == [] and stop_at[0] < 30
