"""Context distillation: loss correctness, learning, frozen sink, data order, checkpoints and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.cartridge.format import cartridge_embeddings, create_cartridge_model
from engine.selfstudy.conversations import Conversation
from engine.engines.models import chat_ids, context_system_prompt
from engine.training.distill import (
    PRESETS,
    TrainConfig,
    _collate,
    _example,
    batch_indices,
    distill,
    distill_loss,
)
from tests.tiny_model import shared_tiny_lm, tiny_lm

CORPUS = "The red lathe is in room 4. Members pay 32 pounds a month. The laser cutter needs an induction. "
QUESTIONS = ["Where is the lathe?", "How much is membership?", "What needs an induction?", "Tell me about room 4."]


@torch.no_grad()
def teacher_conversations(lm, k=8, n_answer=6) -> list[Conversation]:
    """Conversations whose top-k come from the model with the corpus in its system prompt."""
    rng = np.random.default_rng(0)
    convs = []
    for q in QUESTIONS:
        prompt = chat_ids(lm.tokenizer, [{"role": "system", "content": context_system_prompt(CORPUS)},
                                         {"role": "user", "content": q}], add_generation_prompt=True)
        answer = rng.integers(100, 5000, size=n_answer).tolist()
        logits = lm.model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : len(prompt) - 1 + n_answer]
        top = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
        convs.append(Conversation(user=q, answer_ids=answer, topk_ids=top.indices.numpy(),
                                  topk_logprobs=top.values.numpy(), files=["a.md"], file_hashes=["0" * 64],
                                  seed_type="question"))
    return convs


def test_distill_loss_matches_full_logits_reference():
    lm = shared_tiny_lm()
    convs = teacher_conversations(lm)
    peft_model = create_cartridge_model(lm, 8, CORPUS)
    cfg = TrainConfig(p=8)
    examples = [_example(lm, c, cfg, 8) for c in convs[:3]]
    batch = _collate(examples, lm.tokenizer.pad_token_id, lm.device)
    got = distill_loss(peft_model, batch, torch.autocast("cpu", enabled=False))

    # Reference: one conversation at a time, all logits, explicit indexing.
    terms = []
    with torch.no_grad():
        for conv, ex in zip(convs[:3], examples):
            logits = peft_model(input_ids=torch.tensor([ex.ids])).logits[0]
            logp = torch.log_softmax(logits, -1)
            for j, pos in enumerate(ex.positions):
                ids = torch.from_numpy(conv.topk_ids[j].astype(np.int64))
                w = torch.from_numpy(conv.topk_logprobs[j].astype(np.float32)).exp()
                terms.append(-(w * logp[pos, ids]).sum())
    torch.testing.assert_close(got.detach(), torch.stack(terms).mean(), atol=1e-4, rtol=1e-4)
    # Positions are the ones that predict the answer tokens: the last prompt token predicts answer[0].
    ex = examples[0]
    assert ex.ids[ex.positions[1]] == int(convs[0].answer_ids[0])


def test_loss_falls_and_sink_stays_frozen():
    lm = tiny_lm(seed=3)
    convs = teacher_conversations(lm)
    peft_model = create_cartridge_model(lm, 8, "Unrelated words about sailing boats and weather. " * 3)
    encoder = peft_model.prompt_encoder["default"]
    sink_before = encoder.frozen_embedding.detach().clone()
    rest_before = encoder.trainable_embedding.detach().clone()
    seen = []
    result = distill(peft_model, lm, convs, TrainConfig(p=8, steps=10, batch_size=4, lr=0.1), on_step=seen.append)
    assert result.steps == 10 and not result.stopped
    # Compare the part of the loss above its floor (the teacher's own top-k entropy), which is what can fall.
    floor = np.mean([-(np.exp(c.topk_logprobs.astype(np.float64)) * c.topk_logprobs).sum(-1) for c in convs])
    assert result.losses[-1] - floor < 0.7 * (result.losses[0] - floor), (floor, result.losses)
    assert torch.equal(encoder.frozen_embedding.detach(), sink_before)
    assert not torch.equal(encoder.trainable_embedding.detach(), rest_before)
    assert torch.equal(cartridge_embeddings(peft_model)[0], sink_before[0])
    assert [m.step for m in seen] == list(range(1, 11)) and seen[-1].eta_s == 0 and seen[0].tokens_per_s > 0


def test_batch_order_covers_each_epoch_once():
    n, b = 10, 3
    stream = [i for step in range(10) for i in batch_indices(n, b, step, seed=7)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled per epoch
    assert batch_indices(n, b, 4, seed=7) == batch_indices(n, b, 4, seed=7)
    assert batch_indices(n, b, 4, seed=7) != batch_indices(n, b, 4, seed=8)


def test_resume_matches_uninterrupted_run(tmp_path):
    lm = shared_tiny_lm()
    convs = teacher_conversations(lm)
    cfg = TrainConfig(p=8, steps=6, batch_size=2, checkpoint_every=2, seed=1)

    straight = create_cartridge_model(lm, 8, CORPUS)
    full = distill(straight, lm, convs, cfg)

    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    first = create_cartridge_model(lm, 8, CORPUS)
    part = distill(first, lm, convs, cfg, checkpoint_dir=tmp_path, should_stop=stop_after_three)
    assert part.stopped and part.steps == 3

    second = create_cartridge_model(lm, 8, "a different init: the checkpoint must overwrite it")
    rest = distill(second, lm, convs, cfg, checkpoint_dir=tmp_path, resume=True)
    assert rest.steps == 6 and not rest.stopped
    np.testing.assert_allclose(rest.losses, full.losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cartridge_embeddings(second), cartridge_embeddings(straight), atol=1e-5, rtol=1e-4)
    assert len(list(tmp_path.glob("ckpt-*.safetensors"))) == 1


def test_checkpoints_wait_for_their_minimum_interval(tmp_path):
    """checkpoint_every counts steps; checkpoint_min_s keeps fast steps from writing a checkpoint each time."""
    lm = shared_tiny_lm()
    convs = teacher_conversations(lm)
    seen = {}
    for label, min_s in (("every", 0.0), ("spaced", 3600.0)):
        folder = tmp_path / label
        cfg = TrainConfig(p=8, steps=3, batch_size=2, checkpoint_every=1, checkpoint_min_s=min_s, seed=1)
        seen[label] = files = []
        distill(create_cartridge_model(lm, 8, CORPUS), lm, convs, cfg, checkpoint_dir=folder,
                on_step=lambda m, folder=folder, files=files: files.append(sorted(f.name for f in folder.glob("ckpt-*"))))
    # on_step comes before the step's checkpoint, so each call sees the one of the step before
    assert seen["every"] == [[], ["ckpt-0000001.safetensors"], ["ckpt-0000002.safetensors"]]
    assert seen["spaced"] == [[], [], []]


def test_resume_refuses_other_frozen_count(tmp_path):
    from engine.errors import UserError
    from peft import get_peft_model

    from engine.cartridge.format import peft_config_for

    lm = shared_tiny_lm()
    convs = teacher_conversations(lm)
    cfg = TrainConfig(p=8, steps=2, batch_size=2, checkpoint_every=1)
    distill(create_cartridge_model(lm, 8, CORPUS), lm, convs, cfg, checkpoint_dir=tmp_path)
    other = get_peft_model(lm.model, peft_config_for(8, num_frozen_tokens=2))
    with pytest.raises(UserError, match="num_frozen_tokens"):
        distill(other, lm, convs, cfg, checkpoint_dir=tmp_path, resume=True)


def test_loss_on_all_adds_user_positions():
    lm = shared_tiny_lm()
    conv = teacher_conversations(lm)[0]
    only_answer = _example(lm, conv, TrainConfig(loss_on="assistant"), 8)
    with_user = _example(lm, conv, TrainConfig(loss_on="all"), 8)
    assert not only_answer.hard_positions
    decoded = lm.tokenizer.decode(with_user.hard_targets)
    assert decoded.strip() == conv.user
    peft_model = create_cartridge_model(lm, 8, CORPUS)
    result = distill(peft_model, lm, [conv], TrainConfig(p=8, steps=1, batch_size=1, loss_on="all"))
    assert np.isfinite(result.loss_last)


def test_presets_and_overrides():
    assert set(PRESETS) == {"demo", "quick", "standard", "thorough"}
    cfg = PRESETS["quick"].replace(p=64, steps=None)
    assert cfg.p == 64 and PRESETS["quick"].p == 128 and PRESETS["quick"].max_p == 1024
    assert PRESETS["quick"].ema == 0.98 and PRESETS["demo"].ema == 0.0  # quick keeps the moving average
    assert PRESETS["quick"].checkpoint_min_s == 60.0 and PRESETS["demo"].checkpoint_min_s == 0.0
    assert TrainConfig(batch_size=4).total_steps(10) == 3
    with pytest.raises(Exception):
        PRESETS["quick"].replace(nonsense=1)


def test_loss_same_without_mask_logits_to_keep(monkeypatch):
    """Older transformers 5.x lack boolean logits_to_keep; the index fallback gives the same loss."""
    import engine.training.distill as training

    lm = shared_tiny_lm()
    convs = teacher_conversations(lm)
    peft_model = create_cartridge_model(lm, 8, CORPUS)
    batch = _collate([_example(lm, c, TrainConfig(), 8) for c in convs], lm.tokenizer.pad_token_id, lm.device)
    off = torch.autocast("cpu", enabled=False)
    with_mask = distill_loss(peft_model, batch, off)
    monkeypatch.setattr(training, "_MASK_LOGITS_OK", False)
    torch.testing.assert_close(distill_loss(peft_model, batch, off), with_mask)


def test_the_moving_average_is_the_state_handed_back_and_survives_a_resume(tmp_path):
    lm = shared_tiny_lm()
    convs = teacher_conversations(lm)
    cfg = TrainConfig(p=8, steps=4, batch_size=2, checkpoint_every=2, seed=1, lr=0.05)

    plain = create_cartridge_model(lm, 8, CORPUS)
    start = plain.prompt_encoder["default"].trainable_embedding.detach().clone()
    states = []
    distill(plain, lm, convs, cfg,
            on_step=lambda m: states.append(plain.prompt_encoder["default"].trainable_embedding.detach().clone()))
    expected = start
    for state in states:
        expected = 0.5 * expected + 0.5 * state
    assert not torch.allclose(expected, states[-1], atol=1e-4)  # the average is not the last state

    averaged = create_cartridge_model(lm, 8, CORPUS)
    distill(averaged, lm, convs, cfg.replace(ema=0.5))
    torch.testing.assert_close(averaged.prompt_encoder["default"].trainable_embedding.detach(), expected,
                               atol=1e-5, rtol=1e-4)

    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    first = create_cartridge_model(lm, 8, CORPUS)
    assert distill(first, lm, convs, cfg.replace(ema=0.5), checkpoint_dir=tmp_path, should_stop=stop_after_three).stopped
    resumed = create_cartridge_model(lm, 8, "a different init: the checkpoint must overwrite it")
    distill(resumed, lm, convs, cfg.replace(ema=0.5), checkpoint_dir=tmp_path, resume=True)
    torch.testing.assert_close(cartridge_embeddings(resumed), cartridge_embeddings(averaged), atol=1e-5, rtol=1e-4)
