"""Cartridge initialisation, disk format, refusal of foreign folders, composition and generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.cartridge.format import (
    ADAPTER_WEIGHTS,
    METADATA,
    Cartridge,
    cartridge_embeddings,
    compose,
    create_cartridge_model,
    init_ids,
    kv_bytes,
    kv_width,
    load_cartridge,
    peft_config_for,
    save_cartridge,
    to_cache,
)
from engine.errors import CartridgeMismatch
from engine.engines.models import chat_ids
from engine.engines.torch_engine import TorchEngine
from tests.tiny_model import shared_tiny_lm, tiny_lm

TEXT = (
    "Tidewater Makerspace opens at 9:00 AM on Saturdays and closes at 6:00 PM. "
    "The laser cutter needs a safety induction; the lathe is booked through the front desk. "
)


def _question(lm):
    return chat_ids(lm.tokenizer, [{"role": "user", "content": "When does it open?"}], add_generation_prompt=True)


def _logits_in_context(lm, prefix_ids, ids):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([prefix_ids + ids])).logits[0, len(prefix_ids):]


def _logits_with_cache(lm, embeddings, ids):
    p = embeddings.shape[0]
    with torch.no_grad():
        mask = torch.ones(1, p + len(ids), dtype=torch.long)
        return lm.model(input_ids=torch.tensor([ids]), cache=to_cache(embeddings, lm), attention_mask=mask).logits[0]


def _meta(lm, **extra):
    return {"base_model": lm.spec, "fingerprint": lm.fingerprint, "n_layers": lm.n_layers,
            "n_kv_heads": lm.n_kv_heads, "head_dim": lm.head_dim, "corpus": "c", "version": 1, **extra}


def test_init_matches_text_in_context():
    lm = shared_tiny_lm()
    p = 24
    peft_model = create_cartridge_model(lm, p, TEXT * 3)
    q = _question(lm)
    ref = _logits_in_context(lm, init_ids(lm, p, TEXT * 3), q)
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long)).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # The cache path used for chat gives the same result as the PEFT forward used in training.
    torch.testing.assert_close(_logits_with_cache(lm, cartridge_embeddings(peft_model), q), ref, atol=1e-4, rtol=1e-4)
    # The eval's `init` mode rebuilds exactly this untrained cartridge from the same ids.
    from engine.cartridge.format import prefix_embeddings

    torch.testing.assert_close(prefix_embeddings(lm, init_ids(lm, p, TEXT * 3)), cartridge_embeddings(peft_model),
                               atol=1e-5, rtol=1e-5)
    # And a different context gives clearly different logits (the comparison is not vacuous).
    other = _logits_in_context(lm, init_ids(lm, p, "Completely unrelated words about the weather. " * 5), q)
    assert (other - ref).abs().max() > 1e-2


def test_short_text_is_repeated_to_fill_p():
    lm = shared_tiny_lm()
    ids = init_ids(lm, 64, "tiny")
    assert len(ids) == 64
    assert ids.count(lm.tokenizer.bos_token_id) == 1  # one system message, no stray BOS


def test_embeddings_include_frozen_sink_and_shape():
    lm = shared_tiny_lm()
    peft_model = create_cartridge_model(lm, 8, TEXT)
    emb = cartridge_embeddings(peft_model)
    assert emb.shape == (8, kv_width(lm)) == (8, lm.n_layers * 2 * lm.n_kv_heads * lm.head_dim)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].shape[0] == 7
    assert kv_bytes(10, lm) == 10 * kv_width(lm) * 2


def test_save_load_identical_logits_and_peft_loadable(tmp_path):
    from peft import PeftModel

    lm = shared_tiny_lm()
    peft_model = create_cartridge_model(lm, 12, TEXT)
    with torch.no_grad():  # move away from the init so the test sees trained-like values
        peft_model.prompt_encoder.default.trainable_embedding.add_(0.1)
    emb = cartridge_embeddings(peft_model)
    folder = tmp_path / "cart"
    save_cartridge(emb, peft_model.peft_config["default"], folder, _meta(lm))
    cart = load_cartridge(folder, lm)
    assert torch.equal(cart.embeddings, emb)
    q = _question(lm)
    torch.testing.assert_close(_logits_with_cache(lm, cart.embeddings, q), _logits_with_cache(lm, emb, q), atol=0, rtol=0)
    meta = json.loads((folder / METADATA).read_text())
    assert meta["format"] == "cartridge-desktop/1" and meta["p"] == 12 and meta["fingerprint"] == lm.fingerprint

    reloaded = PeftModel.from_pretrained(lm.model, str(folder))
    assert torch.equal(reloaded.prompt_encoder["default"].weight.detach(), emb)


def test_save_replaces_existing_atomically(tmp_path):
    lm = shared_tiny_lm()
    folder = tmp_path / "cart"
    cfg = peft_config_for(4)
    save_cartridge(torch.zeros(4, kv_width(lm)), cfg, folder, _meta(lm))
    save_cartridge(torch.ones(4, kv_width(lm)), cfg, folder, _meta(lm))
    assert torch.equal(load_cartridge(folder, lm).embeddings, torch.ones(4, kv_width(lm)))
    assert [p.name for p in tmp_path.iterdir()] == ["cart"]  # no temp or old folders left behind


def test_refuses_other_model(tmp_path):
    lm = shared_tiny_lm()
    folder = tmp_path / "cart"
    save_cartridge(torch.zeros(4, kv_width(lm)), peft_config_for(4), folder,
                   _meta(lm, fingerprint="other-model.gguf@sha256:" + "f" * 64))
    with pytest.raises(CartridgeMismatch, match="made for model other-model.gguf"):
        load_cartridge(folder, lm)


def test_refuses_wrong_shape(tmp_path):
    lm = shared_tiny_lm()
    folder = tmp_path / "cart"
    save_cartridge(torch.zeros(4, kv_width(lm) // 2), peft_config_for(4), folder, _meta(lm))
    with pytest.raises(CartridgeMismatch, match="shape"):
        load_cartridge(folder, lm)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e6])
def test_refuses_values_a_kv_cache_cannot_hold(tmp_path, value):
    """NaN, infinite, or finite but past float16's range, where llama.cpp's KV cache would make it infinite."""
    lm = shared_tiny_lm()
    folder = tmp_path / "cart"
    weights = torch.zeros(4, kv_width(lm))
    weights[2, 3] = value
    save_cartridge(weights, peft_config_for(4), folder, _meta(lm))
    with pytest.raises(CartridgeMismatch, match="training diverged"):
        load_cartridge(folder, lm)
    weights[2, 3] = 60000.0  # large but within float16's range: a cartridge like any other
    save_cartridge(weights, peft_config_for(4), folder, _meta(lm))
    assert load_cartridge(folder, lm).embeddings[2, 3] == 60000.0


@pytest.mark.parametrize("damage", ["missing", "empty", "no_meta", "bad_json", "corrupt_weights", "foreign_json",
                                    "p_null", "p_text"])
def test_refuses_corrupt_or_foreign_folder(tmp_path, damage):
    lm = shared_tiny_lm()
    folder = tmp_path / "cart"
    if damage == "missing":
        folder = tmp_path / "nothing-here"
    elif damage == "empty":
        folder.mkdir()
    else:
        save_cartridge(torch.zeros(4, kv_width(lm)), peft_config_for(4), folder, _meta(lm))
        if damage == "no_meta":
            (folder / METADATA).unlink()
        elif damage == "bad_json":
            (folder / METADATA).write_text("{not json")
        elif damage == "corrupt_weights":
            data = (folder / ADAPTER_WEIGHTS).read_bytes()
            (folder / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
        elif damage == "foreign_json":
            (folder / METADATA).write_text(json.dumps({"hello": "world"}))
        elif damage.startswith("p_"):  # edited by hand
            meta = json.loads((folder / METADATA).read_text())
            (folder / METADATA).write_text(json.dumps({**meta, "p": None if damage == "p_null" else "4x"}))
    with pytest.raises(CartridgeMismatch, match="not a cartridge") as info:
        load_cartridge(folder, lm)
    assert "\n" not in str(info.value)


def generate(lm, embeddings, prompt: list[int], max_new_tokens: int) -> list[int]:
    engine = TorchEngine(lm)
    engine.set_prefix(embeddings)
    return engine.generate(prompt, max_new_tokens, stop_ids=set()).tokens


def test_compose_keeps_one_sink_and_generates():
    lm = shared_tiny_lm()
    a = Cartridge(cartridge_embeddings(create_cartridge_model(lm, 10, TEXT)), {}, None)
    b = Cartridge(cartridge_embeddings(create_cartridge_model(lm, 7, "Another folder about boats. " * 4)), {}, None)
    both = compose([a, b])
    assert both.shape == (10 + 7 - 1, kv_width(lm))
    assert torch.equal(both[:10], a.embeddings) and torch.equal(both[10:], b.embeddings[1:])
    out = generate(lm, both, _question(lm), 4)
    assert len(out) == 4 and all(isinstance(t, int) for t in out)


def test_generation_starts_at_position_p():
    """Greedy decoding over the cartridge cache equals decoding with the init tokens in context."""
    lm = shared_tiny_lm()
    p = 16
    emb = cartridge_embeddings(create_cartridge_model(lm, p, TEXT))
    q = _question(lm)
    with_cart = generate(lm, emb, q, 6)
    in_context = generate(lm, None, init_ids(lm, p, TEXT) + q, 6)
    assert with_cart == in_context


def test_two_cartridge_models_share_a_base_without_interference():
    lm = tiny_lm(seed=1)
    q = _question(lm)
    first = create_cartridge_model(lm, 8, TEXT)
    with torch.no_grad():
        before = first(input_ids=torch.tensor([q])).logits
    create_cartridge_model(lm, 8, "Something else entirely. " * 5)
    with torch.no_grad():
        after = first(input_ids=torch.tensor([q])).logits
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_default_model_init_matches_in_context():
    """The real default model: a p=16 cartridge from a text equals those 16 tokens in context."""
    from engine.engines.models import load_model

    lm = load_model(None, "cpu")
    p = 16
    emb = cartridge_embeddings(create_cartridge_model(lm, p, TEXT))
    q = _question(lm)
    ref = _logits_in_context(lm, init_ids(lm, p, TEXT), q)
    got = _logits_with_cache(lm, emb, q)
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    assert lm.fingerprint.startswith("SmolLM2-135M-Instruct.Q4_1.gguf@sha256:")


def _save_tiny_hf(folder, *, chat_template=True, **config_overrides):
    from transformers import AutoTokenizer

    lm = shared_tiny_lm()
    config = lm.model.config.to_dict()
    config.update(config_overrides)
    model = type(lm.model)(type(lm.model.config).from_dict(config))
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(lm.tokenizer.name_or_path)
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    for leftover in ([] if chat_template else list(folder.glob("chat_template.*"))):
        leftover.unlink()
    return folder


def test_load_hf_folder_and_fingerprint(tmp_path):
    from engine.engines.models import load_model

    folder = _save_tiny_hf(tmp_path / "tiny-hf")
    lm = load_model(str(folder), "cpu")
    assert lm.spec == str(folder) and lm.n_kv_heads == 2 and lm.head_dim == 16 and lm.n_layers == 2
    assert lm.fingerprint.startswith("tiny-hf@sha256:") and len(lm.fingerprint.split(":")[1]) == 64
    assert not any(p.requires_grad for p in lm.model.parameters())
    # A cartridge made on it round-trips; the fingerprint survives moving the folder.
    moved = tmp_path / "elsewhere" / "tiny-hf"
    moved.parent.mkdir()
    folder.rename(moved)
    from engine.engines.models import hf_fingerprint

    assert hf_fingerprint(str(moved)) == lm.fingerprint
    # Another fine-tune of the same model: same config, same file names and sizes, other weights.
    other = tmp_path / "other" / "tiny-hf"
    shutil.copytree(moved, other)
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data), 512):
        data[i] ^= 0x55
    weights.write_bytes(bytes(data))
    assert hf_fingerprint(str(other)) != lm.fingerprint


@pytest.mark.parametrize("overrides,chat_template,message", [
    ({"sliding_window": 64}, True, "sliding-window"),
    ({}, False, "chat template"),
])
def test_unsupported_hf_models_are_refused(tmp_path, overrides, chat_template, message):
    from engine.errors import UserError
    from engine.engines.models import load_model

    folder = _save_tiny_hf(tmp_path / "bad", chat_template=chat_template, **overrides)
    with pytest.raises(UserError, match=message):
        load_model(str(folder), "cpu")


def test_composed_cartridges_beyond_the_context_say_so(db):
    """On torch the composed prefix is only measured against the context at the first answer: the message
    names the cartridges, not the conversation."""
    from engine.errors import UserError
    from engine.serve.inference import Chat, Target

    lm = shared_tiny_lm()
    target = Target([{"name": "a", "uid": "1"}, {"name": "b", "uid": "2"}], [{"number": 1}, {"number": 1}],
                    "cartridge", [], None)
    p = lm.max_positions - 8
    chat = Chat(db, target, TorchEngine(lm), lm.tokenizer, torch.zeros(p, kv_width(lm)))
    with pytest.raises(UserError, match=rf"the cartridges \({p:,} positions\) and the conversation needs .* "
                                        "compose fewer corpora"):
        chat.reply([{"role": "user", "content": "Where is the dinghy?"}], max_new_tokens=16)
