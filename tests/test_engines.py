"""The inference interface (`engine.engines.base`): torch and llama.cpp keep the same contract on the
bundled model, and the server implementation refuses what a server cannot do."""

from __future__ import annotations

import numpy as np
import pytest

from engine.engines.base import InferenceEngine
from engine.engines.decoding import stop_ids
from engine.engines.llamacpp import LlamaCppEngine
from engine.engines.llamacpp_inference import LlamaCppInference
from engine.engines.models import chat_ids, context_system_prompt
from engine.engines.server_engine import ServerInference
from engine.engines.torch_engine import TorchEngine
from engine.errors import UserError

SYSTEM = context_system_prompt("The harbour ferry leaves at 7:40 from pier 3. Bikes ride free on weekdays.")
QUESTION = [{"role": "user", "content": "When does the ferry leave, and from where?"}]
INTERFACE = ("set_prefix", "generate", "score", "first_token_s", "kv_bytes", "close")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from engine.engines.models import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARTRIDGE_HOME", str(tmp_path_factory.mktemp("home")))
        lm = load_model()
    llama = LlamaCppEngine(n_ctx=1024, adaptive_threads=False)
    yield lm, {"torch": TorchEngine(lm), "llama.cpp": LlamaCppInference(llama)}
    llama.close()


def test_every_engine_implements_the_interface():
    for cls in (TorchEngine, LlamaCppInference, ServerInference):
        assert all(callable(getattr(cls, name, None)) for name in INTERFACE), cls
        assert isinstance(getattr(cls, "name", None), str)


@pytest.mark.parametrize("name", ["torch", "llama.cpp"])
def test_generate_with_topk_agrees_with_score(engines, name):
    """With a prefix in front: the greedy tokens are the top rows' first ids, a stop adds its own row, and
    scoring the answer gives the log-probabilities generation saw."""
    lm, by_name = engines
    engine = by_name[name]
    assert isinstance(engine, InferenceEngine) and engine.name == name
    system_ids = chat_ids(lm.tokenizer, [{"role": "system", "content": SYSTEM}], add_generation_prompt=False)
    assert engine.set_prefix(system_ids=system_ids) == len(system_ids)
    prompt = chat_ids(lm.tokenizer, [{"role": "system", "content": SYSTEM}] + QUESTION,
                      add_generation_prompt=True)[len(system_ids):]
    streamed: list[int] = []
    out = engine.generate(prompt, 40, k=5, stop_ids=stop_ids(lm.tokenizer), on_token=streamed.append)
    assert out.tokens and streamed == out.tokens
    assert out.topk_ids.shape == (len(out.tokens) + out.stopped, 5) == out.topk_logprobs.shape
    assert list(out.topk_ids[:len(out.tokens), 0]) == out.tokens
    assert np.all(np.diff(out.topk_logprobs, axis=1) <= 0)  # best first
    seen = -float(np.mean(out.topk_logprobs[:len(out.tokens), 0]))
    scored = engine.score(prompt + out.tokens, len(prompt))
    assert scored == pytest.approx(seen, abs=0.02 if name == "torch" else 0.1)  # bf16 / quantised: incremental and batch round apart
    assert "7:40" in lm.tokenizer.decode(out.tokens)  # the prefix is in front

    # should_stop ends the answer after the token it was asked on; nothing in front is another prompt
    asked: list[int] = []
    cut = engine.generate(prompt, 40, should_stop=lambda: len(asked.append(1) or asked) >= 3)
    assert cut.tokens == out.tokens[:3] and not cut.stopped
    assert engine.set_prefix() == 0
    bare = engine.generate(prompt, 8, stop_ids=set())
    assert len(bare.tokens) == 8 and bare.topk_ids is None
    assert engine.kv_bytes(10) == 10 * lm.n_layers * 2 * lm.n_kv_heads * lm.head_dim * 2
    assert engine.first_token_s(prompt) > 0


def test_a_server_takes_no_cartridge():
    server = ServerInference.__new__(ServerInference)  # no server needed to refuse before any request
    server.system = []
    with pytest.raises(UserError, match="takes no cartridge"):
        server.set_prefix(np.zeros((4, 8), np.float32))
    assert server.set_prefix(system_ids=[1, 2, 3]) == 3
    with pytest.raises(UserError, match="not scored"):
        server.score([1, 2, 3], 1)
