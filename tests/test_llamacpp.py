"""Cartridges served through llama.cpp: the KV-state writer, against llama.cpp itself and against torch.

Real default model (SmolLM2-135M-Instruct Q4_1). Tolerances:
- injected KV vs the same tokens evaluated by llama.cpp: logits bit-identical (max |diff| == 0), same
  32-token greedy continuation (the state round-trips f16 -> fp32 -> f16 exactly);
- llama.cpp's KV vs torch's (fp32, dequantised weights) for the same tokens: relative L2 error < 5% for
  keys and < 10% for values (measured 1.5% / 3.4%); without the head-dim permutation keys are off by > 100%;
- llama.cpp with a torch cartridge injected vs torch with that cartridge, teacher-forced over the prompt
  and 24 answer tokens: top-1 agreement >= 85% and mean KL(torch || llama.cpp) < 0.05 nats
  (Q4_1 weights with Q8 activations vs fp32; measured ~0.003 at the next-token position).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.cartridge.format import compose, Cartridge, init_ids, to_cache
from engine.errors import CartridgeMismatch, UserError
from engine.engines.llamacpp import (
    KVLayout,
    LayoutUnsupported,
    LlamaCppEngine,
    decode_state,
    encode_state,
    hf_to_gguf_order,
    log_softmax,
    template_prefix_ids,
    topk_logprobs,
)
from engine.engines.models import chat_ids
from tests.conftest import ASSETS

P = 48


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from engine.engines.models import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARTRIDGE_HOME", str(tmp_path_factory.mktemp("home")))
        return load_model()


@pytest.fixture(scope="module")
def engine():
    eng = LlamaCppEngine(n_ctx=512, adaptive_threads=False)  # fixed threads: bit-exact comparisons
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def texts():
    return [(ASSETS / "sample" / name).read_text(encoding="utf-8") for name in ("handbook.md", "safety.md")]


def torch_kv(lm, ids: list[int]) -> torch.Tensor:
    """The KV torch computes for `ids` at positions 0.., as a [p, width] cartridge tensor (PEFT layout)."""
    with torch.no_grad():
        cache = lm.model(input_ids=torch.tensor([ids]), use_cache=True).cache
    layers = []
    for layer in range(lm.n_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [heads, p, dim]
        layers.append(torch.stack([keys, values], dim=0).permute(2, 0, 1, 3))  # [p, 2, heads, dim]
    return torch.stack(layers, dim=1).reshape(len(ids), -1).float()


def torch_logits(lm, embeddings: torch.Tensor, ids: list[int]) -> np.ndarray:
    """Torch logits for every position of `ids` after the cartridge (fp32, the engine.cartridge.format cache path)."""
    p = embeddings.shape[0]
    with torch.no_grad():
        mask = torch.ones(1, p + len(ids), dtype=torch.long)
        out = lm.model(input_ids=torch.tensor([ids]), cache=to_cache(embeddings, lm), attention_mask=mask)
    return out.logits[0].float().numpy()


def question(lm, text: str = "What must everyone do before using the laser cutter?") -> list[int]:
    return chat_ids(lm.tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def test_state_layout_matches_torch_kv(lm, engine, texts):
    ids = init_ids(lm, P, texts[0])
    engine.prefix_from_tokens(ids)
    state = engine.read_state()
    layout = engine.layout
    assert layout == KVLayout(n_layer=lm.n_layers, n_kv_heads=lm.n_kv_heads, head_dim=lm.head_dim, v_trans=True)
    assert len(state) == layout.state_size(P)
    parsed = decode_state(state, layout)
    assert parsed.seq_id == 0 and list(parsed.positions) == list(range(P))
    assert encode_state(parsed.embeddings, layout) == state  # every byte accounted for

    ours = parsed.embeddings.reshape(P, lm.n_layers, 2, lm.n_kv_heads, lm.head_dim)
    theirs = torch_kv(lm, ids).numpy().reshape(ours.shape)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    assert rel(ours[:, :, 0], theirs[:, :, 0]) < 0.05
    assert rel(ours[:, :, 1], theirs[:, :, 1]) < 0.10
    # The head-dim permutation is real: llama.cpp's keys read in GGUF order do not match torch's.
    unpermuted = ours[:, :, 0][..., hf_to_gguf_order(lm.head_dim)]
    assert rel(unpermuted, theirs[:, :, 0]) > 0.5


def test_injected_state_equals_evaluated_tokens(lm, engine, texts):
    ids = init_ids(lm, P, texts[0])
    prompt = question(lm)
    engine.prefix_from_tokens(ids)
    own_kv = engine.read_kv()
    evaluated = engine.next_token_logits(prompt)
    evaluated_gen = engine.generate(prompt, 32, stop_ids=set())

    assert engine.inject(own_kv) == P and engine.n_past == P
    injected = engine.next_token_logits(prompt)
    assert engine.n_past == P + len(prompt)
    assert np.abs(injected - evaluated).max() == 0.0
    assert engine.generate(prompt, 32, stop_ids=set()) == evaluated_gen
    assert len(evaluated_gen) == 32


def test_torch_cartridge_agrees_with_torch(lm, engine, texts):
    ids = init_ids(lm, P, texts[0])
    emb = torch_kv(lm, ids)
    prompt = question(lm)
    engine.inject(emb)
    answer = engine.generate(prompt, 24, stop_ids=set())
    forced = prompt + answer
    engine.inject(emb)
    ours = engine.eval(forced, all_logits=True)[len(prompt) - 1:]
    theirs = torch_logits(lm, emb, forced)[len(prompt) - 1:]
    assert ours.shape == theirs.shape == (len(answer) + 1, engine.n_vocab)
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    lp_t = np.stack([log_softmax(r) for r in theirs])
    lp_o = np.stack([log_softmax(r) for r in ours])
    kl = float((np.exp(lp_t) * (lp_t - lp_o)).sum(-1).mean())
    print(f"llama.cpp vs torch over {len(ours)} positions: top-1 agreement {top1:.3f}, mean KL {kl:.4f}, "
          f"max |logit diff| {np.abs(ours - theirs).max():.3f}")
    # Near-ties may flip between a quantised and an fp32 matmul; where torch is clearly sure, both agree.
    top2 = np.sort(lp_t, axis=-1)[:, -2:]
    sure = (top2[:, 1] - top2[:, 0]) > 0.5
    assert (ours.argmax(-1) == theirs.argmax(-1))[sure].all(), (top1, sure.sum())
    assert top1 >= 0.75, top1
    assert kl < 0.05, kl
    assert ours[0].argmax() in np.argsort(-theirs[0])[:3]


def test_composed_cartridges_generate(lm, engine, texts):
    parts = [Cartridge(torch_kv(lm, init_ids(lm, 24, t)), {}, None) for t in texts]
    emb = compose(parts)
    assert emb.shape[0] == 24 + 23
    prompt = question(lm, "What are the opening hours, and what safety gear is needed?")
    engine.inject(emb, warm_ids=template_prefix_ids(lm.tokenizer))
    streamed: list[int] = []
    out = engine.generate(prompt, 16, on_token=streamed.append)
    assert out and streamed == out
    assert engine.n_past == emb.shape[0] + len(prompt) + len(out) - 1
    engine.inject(emb)
    ours = engine.next_token_logits(prompt)
    theirs = torch_logits(lm, emb, prompt)[-1]
    assert ours.argmax() == theirs.argmax()


def test_the_same_prompt_gives_the_same_answer_whatever_the_engine_held(lm, engine, texts):
    """A repeated prompt reuses its saved logits (its last token evaluated alone rounds differently), so a
    greedy answer does not depend on what the engine held before; a new cartridge forgets them."""
    emb = torch_kv(lm, init_ids(lm, 24, texts[0]))
    prompt = question(lm, "When is the workshop closed?")
    engine.inject(emb)
    batch = engine.next_token_logits(prompt)  # the whole prompt in one batch
    first = engine.generate(prompt, 24)
    assert np.array_equal(engine.next_token_logits(prompt), batch)
    assert [engine.generate(prompt, 24) for _ in range(2)] == [first, first]
    engine.inject(torch_kv(lm, init_ids(lm, 24, texts[1])))
    fresh = engine.next_token_logits(prompt)
    engine.inject(emb)
    assert not np.array_equal(engine.next_token_logits(prompt), fresh)


def test_wrong_layouts_are_refused(lm, engine, texts, monkeypatch):
    emb = torch_kv(lm, init_ids(lm, 8, texts[0]))
    good = encode_state(emb, engine.layout)

    bad_magic = b"\0\0\0\0" + good[4:]
    with pytest.raises(LayoutUnsupported):
        decode_state(bad_magic, engine.layout)
    with pytest.raises(LayoutUnsupported, match="refused"):
        engine.write_state(bad_magic, prefix_len=8)
    assert engine.n_past == 0

    other = KVLayout(n_layer=engine.layout.n_layer - 1, n_kv_heads=engine.layout.n_kv_heads,
                     head_dim=engine.layout.head_dim)
    fewer_layers = encode_state(emb.reshape(8, -1)[:, : other.width], other)
    with pytest.raises(LayoutUnsupported, match="layer"):
        engine.write_state(fewer_layers, prefix_len=8)
    with pytest.raises(LayoutUnsupported, match="layers"):
        decode_state(fewer_layers, engine.layout)
    with pytest.raises(LayoutUnsupported):
        decode_state(good[:-3], engine.layout)
    with pytest.raises(CartridgeMismatch):
        engine.inject(emb[:, :-64])
    assert issubclass(LayoutUnsupported, UserError)

    # The engine still works after refusals.
    engine.inject(emb)
    assert engine.generate(question(lm), 4, stop_ids=set())

    import llama_cpp

    monkeypatch.setattr(llama_cpp, "__version__", "9.9.9")
    with pytest.raises(LayoutUnsupported, match="9.9.9"):
        LlamaCppEngine(n_ctx=256)
    monkeypatch.undo()
    monkeypatch.setattr(LlamaCppEngine, "_head_dim", lambda self: 32)
    with pytest.raises(LayoutUnsupported, match="bytes"):
        LlamaCppEngine(n_ctx=256)


def test_thread_governor_falls_back_and_retries():
    from engine.engines.llamacpp import ThreadGovernor

    gov = ThreadGovernor(slow_factor=6.0, single_margin=1.25, min_slow_s=0.05, hold_s=15.0, max_hold_s=60.0)
    assert gov.choose(44, now=0.0)
    assert not gov.observe(44, 0.15, now=0.0)  # first full-thread call sets the reference
    assert not gov.choose(44, now=1.0)  # the next one runs on one thread, to learn its speed
    assert not gov.observe(44, 0.27, now=1.0, full=False)
    assert gov.choose(44, now=2.0) and gov.choose(1, now=2.0) and gov.choose(5, now=2.0)
    assert not gov.observe(44, 0.30, now=2.0)  # busy machine, yet still faster than one thread
    assert gov.observe(44, 4.3, now=3.0) and gov.fallbacks == 1  # stalled spinning threads
    assert not gov.choose(44, now=10.0) and not gov.choose(1, now=10.0)
    assert gov.choose(44, now=18.5)  # hold over: full threads again
    assert gov.observe(44, 0.5, now=18.5)  # slower than one thread: starved again, held twice as long
    assert gov.reduced(18.5 + 29.0) and not gov.reduced(18.5 + 31.0)
    assert not gov.observe(44, 0.2, now=60.0) and gov.hold_s == 15.0  # a good call resets the hold
    assert not gov.observe(3, 0.03, now=70.0)  # too short to judge


def test_topk_logprobs():
    logits = np.array([0.0, 3.0, 1.0, 2.0, -1.0], dtype=np.float32)
    ids, lp = topk_logprobs(logits, 3)
    assert list(ids) == [1, 3, 2]
    full = np.log(np.exp(logits) / np.exp(logits).sum())
    assert np.allclose(lp, full[[1, 3, 2]], atol=1e-6)


def test_llamacpp_synthesis(lm, monkeypatch):
    from engine.corpus.chunks import Chunk
    from engine.engines.decoding import loop_start
    from engine.selfstudy import llamacpp_backend, synthesis
    from engine.selfstudy.prompts import load_seed_prompts

    def no_torch(*args, **kwargs):
        raise AssertionError("the llama.cpp backend fell back to torch")

    monkeypatch.setattr(llamacpp_backend, "_synthesize_torch", no_torch)
    text = (ASSETS / "sample" / "safety.md").read_text(encoding="utf-8")[:600]
    chunks = [Chunk(text, ["safety.md"], ["abc"], 0, 140)] * 3
    seeds = load_seed_prompts(ASSETS / "seeds")
    progress = []
    convs = list(synthesis.synthesize(lm, chunks, 1, seeds=seeds, k=20, max_user_tokens=48, max_answer_tokens=24,
                                      seed=1, on_progress=lambda d, n: progress.append(d), backend="llamacpp"))
    assert len(convs) == 1 and progress == [1]
    eos = {lm.tokenizer.eos_token_id, lm.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for c in convs:
        assert c.user and c.seed_type in seeds and c.files == ["safety.md"]
        assert c.topk_ids.shape == (c.n_tokens, 20) and c.topk_logprobs.dtype == np.float16
        # Greedy answer: every answer token is the teacher's top-1 of the same step.
        assert np.array_equal(c.topk_ids[:, 0], c.answer_ids)
        assert np.all(np.diff(c.topk_logprobs.astype(np.float32), axis=1) <= 1e-3)
        assert c.n_tokens <= 24  # shorter: ended by the stop token or cut where greedy decoding looped
        assert loop_start(c.answer_ids.tolist()) is None


def test_llamacpp_runs_in_a_worker_process_and_a_crash_there_is_a_clear_error(tmp_path, monkeypatch):
    """Chat on llama.cpp runs in a worker process: the worker answers as the engine does in process, and when
    native code dies there (a real SIGSEGV to the worker) the chat raises a clear error, the app's process
    lives on, and the next chat starts a new worker."""
    import os
    import signal

    from engine.store import registry
    from engine.serve.inference import open_chat
    from engine.corpus.ingest import ingest
    from engine.engines.llamacpp_worker import LlamaCppCrashed

    monkeypatch.setenv("CARTRIDGE_HOME", str(tmp_path / "home"))
    db = registry.open_registry()
    ingest(ASSETS / "sample", db=db)
    question = [{"role": "user", "content": "Say hello."}]
    chat = open_chat(db, ["sample"], mode="none", engine="llama.cpp")
    worker = chat.llama._proc
    assert worker.pid != os.getpid() and worker.poll() is None
    streamed = []
    reply = chat.reply(question, max_new_tokens=8, on_text=streamed.append)
    assert reply.answer and reply.engine == "llama.cpp" and "".join(streamed).strip().startswith(reply.answer.strip()[:5])
    with LlamaCppEngine(n_ctx=4096) as local:  # the same greedy answer in process
        ids = chat.prompt_ids(question)
        assert chat.llama.generate(ids, max_new_tokens=8) == local.generate(ids, max_new_tokens=8)

    # A stop raised in a callback (the UI's Stop button) ends the call in the worker too; the next call is in step.
    asked = []
    stopped = chat.reply(question, max_new_tokens=8, should_stop=lambda: len(asked.append(1) or asked) >= 3)
    assert len(asked) == 3 and stopped.n_tokens < 3 and reply.answer.startswith(stopped.answer)
    assert chat.reply(question, max_new_tokens=8).answer == reply.answer

    os.kill(worker.pid, signal.SIGSEGV)
    with pytest.raises(LlamaCppCrashed, match="SIGSEGV"):
        chat.reply(question, max_new_tokens=8)
    assert isinstance(LlamaCppCrashed("x"), UserError)  # shown as an error message, not a traceback
    again = open_chat(db, ["sample"], mode="none", engine="llama.cpp")
    assert again.reply(question, max_new_tokens=8).answer == reply.answer
    again.llama.close()
