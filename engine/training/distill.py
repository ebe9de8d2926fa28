"""Context distillation: train the cartridge so that the model *without* the corpus in context answers
like the model *with* it (the teacher's top-k distributions stored by self-study).

A plain loop: batch -> forward with the cartridge in front -> loss at supervised positions -> Adam step
on the cartridge only. The data order is a pure function of (seed, step), which makes resuming from a
checkpoint exact without pickling any RNG state.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.selfstudy.conversations import Conversation
from engine.selfstudy.verbatim import verbatim_count
from engine.errors import UserError
from engine.store.library import icl_fits
from engine.engines.models import LoadedModel, chat_ids, passages_messages

LOSS_ON = ("assistant", "all")
TEACHERS = ("corpus", "chunk")
LR_SCHEDULES = ("constant", "cosine")
INITS = ("first", "spread", "attention")
QUOTES = ("random", "spread")


@dataclass
class TrainConfig:
    p: int = 128  # virtual tokens in the cartridge (the floor when scaled, see `p_for`)
    max_p: int = 0  # > 0: p grows with the corpus up to this cap
    # > 0 (with max_p): the cap for a folder beyond the default model's context instead. Such a folder is
    # chatted with beside retrieval (cartridge+rag), whose passages take as much KV memory again.
    max_p_beyond_context: int = 0
    conversations: int = 120  # self-study conversations to synthesize (the floor when scaled, see below)
    conversations_per_ktok: float = 0.0  # > 0: scale the count with the corpus, per 1,000 corpus tokens ...
    max_conversations: int = 0  # ... up to this cap
    steps: int | None = None  # None: `epochs` passes over the conversations
    epochs: float = 1.0
    batch_size: int = 4
    lr: float = 2e-2
    chunk_tokens: int = 512  # corpus chunk size shown to the teacher during synthesis
    loss_on: str = "assistant"  # "all" also trains on the user turn (hard labels, see `_user_positions`)
    seed: int = 0
    checkpoint_every: int = 25  # steps between checkpoints (resume after a kill) ...
    # ... and at least this many seconds apart. A checkpoint holds the cartridge, Adam's two moments, the best
    # and the averaged state: 127 MB at p=512, of which a 40-minute CPU training run wrote 124 every 10 steps.
    checkpoint_min_s: float = 0.0
    max_tokens: int = 1024  # cap on one conversation's student tokens (prompt + answer)
    max_answer_tokens: int = 192  # synthesis: answer length cap
    max_user_tokens: int = 96  # synthesis: user message length cap
    seed_mix: str = ""  # synthesis: how often each seed type is drawn, e.g. "question:4,recall:2" ("": uniformly)
    # synthesis: conversations per sampled chunk; they share the chunk's prompt, evaluated once on llama.cpp
    chunk_questions: int = 1
    # "chunk": the teacher answers from the sampled chunk; "corpus": from the whole corpus (a window around
    # the chunk when too long). Measured on the sample with quick: chunk 47.0% of icl's NLL gain, corpus 43.6%.
    teacher: str = "chunk"
    teacher_tokens: int = 0  # cap on the teacher's corpus window (0: as much as the model's context allows)
    lr_schedule: str = "constant"  # or "cosine": linear warm-up, then cosine decay to a tenth
    warmup: float = 0.05  # share of the steps spent warming up (cosine schedule)
    init: str = "first"  # cartridge start: KV of the corpus's "first" p tokens, of excerpts "spread" across it,
    # or the "attention"-selected KV of the corpus read whole, or in windows beyond the context (engine.cartridge.kv_select)
    heldout: float = 0.1  # share of conversations kept out of training to score the cartridge
    eval_every: int = 12  # steps between held-out scorings (the best state is kept)
    # quoting conversations (the corpus's own words, see engine.selfstudy.verbatim) per self-study one trained
    verbatim: float = 0.0
    cloze: float = 0.0  # share of the quoting conversations that blank out a fact of a sentence instead
    topics: float = 0.0  # share of them that ask about a name of a sentence, answered with that sentence
    # where the quoted passages start: "random", or "spread" (stratified, see ChunkSampler.stratified: every
    # part of the folder quoted about equally often). Measured with quick: spread lowered the answers' NLL on
    # the sample and two untouched folders (82.3% of icl's gain against 73.4% on the pair) but answered fewer
    # questions (8 of 50 against 10), so quick keeps "random" (see the README).
    quotes: str = "random"
    # share of the self-study conversations trained with the passages retrieved for their question in the
    # student's prompt, as chat's cartridge+rag mode puts them after the cartridge (budget: p tokens)
    rag: float = 0.0
    # > 0: score and keep an exponential moving average of the trained cartridge (this weight on the average
    # per step) rather than its last state, which batches of a few conversations make noisy
    ema: float = 0.0

    def conversations_for(self, corpus_tokens: int) -> int:
        """Self-study conversations for a corpus of `corpus_tokens`: scaled with its size, floor and cap."""
        if self.conversations_per_ktok <= 0:
            return self.conversations
        scaled = math.ceil(corpus_tokens / 1000 * self.conversations_per_ktok)
        return max(self.conversations, min(scaled, self.max_conversations or scaled))

    def p_for(self, corpus_tokens: int) -> int:
        """Virtual tokens for a corpus of `corpus_tokens`: with `max_p`, a quarter of its tokens up to 512 and
        an eighth beyond (so its KV stays at least 4x smaller than the folder's, 8x past 4k tokens), in steps
        of 64, between p and max_p. The cartridge starts as excerpts of the corpus, so a larger p starts
        closer to the folder in context: measured on the sample, 29% of icl's NLL gain untrained at p=256,
        39% at 576 (spread excerpts). A folder beyond the context is capped at `max_p_beyond_context`."""
        if self.max_p <= 0:
            return self.p
        cap = self.max_p
        if self.max_p_beyond_context > 0 and not icl_fits(corpus_tokens):
            cap = min(cap, self.max_p_beyond_context)
        scaled = int(min(corpus_tokens / 4, max(corpus_tokens / 8, 512))) // 64 * 64
        return max(self.p, min(scaled, cap))

    def train_examples(self, n_selfstudy: int) -> int:
        """What one pass trains on: the self-study conversations left after the held-out split, plus the
        quoting conversations made beside them."""
        n = n_selfstudy - heldout_count(n_selfstudy, self.heldout)
        return n + verbatim_count(n, self.verbatim)

    def total_steps(self, n_conversations: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(n_conversations * self.epochs / self.batch_size))

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with `overrides` applied; None means "not given" (keeps the current value)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise UserError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        values = asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig(**values)


# quick: p sized to the folder and the attention-selected start (untrained, on the sample at p=576: 47% of icl's
# NLL gain vs 39% from spread excerpts; see the README). 48 self-study conversations at least (8 per 1k
# tokens), each with three quoting conversations beside it: on the sample 77.5% of icl's NLL gain vs 75.3%
# for 96 with one quote each, in about 10 minutes instead of 15 on a 2-core CPU (synthesis ~13
# conversations/min then, ~20 with two decode threads; 129 steps of ~2.5 s at p=576 with bf16 matmuls).
# With that much quoting lr 1e-2 beats 5e-3 on the sample (82.7% vs 77.5%, ready in 9.6 minutes; 32
# conversations with 4.5 quotes each: 78.5%). A cosine schedule from 2e-2 (warm-up, then decay to a tenth)
# answers more of the sample's 36 questions than a constant 1e-2 in the same steps (11 and 8 against 8 and 5 at
# seeds 0 and 1) and recovers more of icl's NLL gain on untuned folders (81.3% against 74.7% over four; see the
# README). Held-out scoring every 32 steps rather than 12 (each scoring costs about 6 s of a 2-core CPU): scored every
# 12, quick's runs kept their last state; on the sample at seed 0, every 32 keeps step 128 of 129 and is ready in
# 10.0 minutes instead of 10.6. A folder beyond the context gets p=512 rather than 1,024, so that cartridge+rag
# holds the KV memory of the larger cartridge alone: on orjson's README (13.6k tokens, same conversations) p=512
# answered 8 of 20 with retrieval against 7 at p=1,024 (rag alone at 1,024 tokens: 5), see the README.
# Batches of 2 rather than 4 (the same examples in twice the steps; held-out scoring every 64 steps, as often as
# before): on the sample 84.6% of icl's NLL gain over three seeds against 80.6% (26 of 108 answers right against
# 28), on four untouched folders 82.2% against 80.1% (26 of 100 right against 23); see the README. Timed side by
# side on a 2-core CPU, a step of 2 takes half a step of 4. Whole runs first took 9-72% longer than with batches
# of 4; repeated (with the moving average below) they took -6% to +17%, so most of that was the machine.
# The moving average of the cartridge (0.98 per step, over about the last 50 steps) is scored and kept rather
# than its last state: on the same conversations, 35 of the sample's 108 answers right over three seeds against
# 26 (icl 33) at about the same NLL (84.1% of icl's gain against 84.6%), and 30 of 100 against 26 on four
# untouched folders (82.4% against 82.2%); see the README.
# standard / thorough: GPU budgets closer to the paper (which used tens of thousands of conversations).
# The count grows with the corpus (per 1,000 tokens) between the floor and the cap, so that a big folder
# is studied as thoroughly as a small one until the cap; an explicit count (--conversations) is used as is.
PRESETS: dict[str, TrainConfig] = {
    # demo: the whole loop (scan -> cartridge -> an answer) in about two minutes on a 2-core CPU; the answers
    # know little of the folder.
    "demo": TrainConfig(p=64, conversations=16, steps=None, epochs=1.0, batch_size=2, chunk_tokens=256,
                        checkpoint_every=4, max_answer_tokens=64, max_user_tokens=48, eval_every=4),
    "quick": TrainConfig(p=128, max_p=1024, max_p_beyond_context=512, conversations=48, conversations_per_ktok=8,
                         max_conversations=256, steps=None, epochs=3.0, batch_size=2, chunk_tokens=512,
                         checkpoint_every=10, checkpoint_min_s=60.0, max_answer_tokens=128, max_user_tokens=64,
                         init="attention", lr=2e-2, lr_schedule="cosine", verbatim=3.0, eval_every=64, ema=0.98),
    "standard": TrainConfig(p=512, conversations=4096, conversations_per_ktok=64, max_conversations=32768, steps=None,
                            batch_size=16, chunk_tokens=1024, checkpoint_every=50, checkpoint_min_s=60.0,
                            max_answer_tokens=256, max_user_tokens=96),
    "thorough": TrainConfig(p=1024, conversations=16384, conversations_per_ktok=256, max_conversations=131072,
                            steps=None, batch_size=32, chunk_tokens=2048, checkpoint_every=100, checkpoint_min_s=60.0,
                            max_tokens=2048, max_answer_tokens=384, max_user_tokens=128),
}


@dataclass
class StepMetrics:
    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    lr: float
    elapsed_s: float
    eta_s: float


@dataclass
class TrainResult:
    loss_first: float  # mean loss of the first (up to) 5 steps
    loss_last: float  # mean loss of the last (up to) 5 steps
    steps: int
    seconds: float
    tokens_per_s: float
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    heldout: dict | None = None  # see BestState.to_json: the held-out score of the returned state


# ----------------------------------------------------------------------------- batches


@dataclass
class _Example:
    ids: list[int]  # student tokens: chat prompt + answer[:-1]
    positions: list[int]  # where the student predicts answer[j] (teacher top-k row j)
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    hard_positions: list[int]  # loss_on="all": positions predicting a user-turn token ...
    hard_targets: list[int]  # ... and those tokens
    targets: list[int] = field(default_factory=list)  # the teacher's answer token at each of `positions`


def _student_messages(tokenizer, conv: Conversation) -> list[dict]:
    """The student's prompt: the user turn, after the conversation's retrieved passages if it has them (laid out
    as chat's cartridge+rag lays them out after the cartridge)."""
    user = [{"role": "user", "content": conv.user}]
    return passages_messages(tokenizer, conv.context, user, after_cartridge=True) if conv.context else user


def _user_positions(tokenizer, conv: Conversation, prompt_ids: list[int]) -> tuple[list[int], list[int]]:
    """(positions, targets) for next-token loss on the user's words inside the chat prompt.

    The teacher has no distribution for the user turn (it was sampled under another prompt), so
    loss_on="all" trains those tokens with plain cross-entropy on the sampled words.
    """
    user = conv.user
    text = tokenizer.apply_chat_template(_student_messages(tokenizer, conv), tokenize=False, add_generation_prompt=True)
    start = text.rfind(user)
    if not user or start < 0:
        return [], []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != prompt_ids:
        return [], []
    end = start + len(user)
    tokens = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= start and b <= end and b > a]
    tokens = [t for t in tokens if t > 0]
    return [t - 1 for t in tokens], [prompt_ids[t] for t in tokens]


def _example(lm: LoadedModel, conv: Conversation, cfg: TrainConfig, p: int) -> _Example | None:
    prompt = chat_ids(lm.tokenizer, _student_messages(lm.tokenizer, conv), add_generation_prompt=True)
    # max_tokens caps the conversation itself; retrieved passages come on top, within the model's positions.
    extra = len(prompt) - len(chat_ids(lm.tokenizer, [{"role": "user", "content": conv.user}], True)) if conv.context else 0
    limit = min(cfg.max_tokens + extra, lm.max_positions - p)
    n = min(conv.n_tokens, limit - len(prompt) + 1)
    if n <= 0:
        return None
    answer = [int(t) for t in conv.answer_ids[:n]]
    ids = prompt + answer[:-1]
    positions = list(range(len(prompt) - 1, len(prompt) - 1 + n))
    hard_pos, hard_tgt = ([], [])
    if cfg.loss_on == "all":
        hard_pos, hard_tgt = _user_positions(lm.tokenizer, conv, prompt)
    return _Example(ids, positions, conv.topk_ids[:n], conv.topk_logprobs[:n], hard_pos, hard_tgt, answer)


def _collate(examples: list[_Example], pad_id: int, device: torch.device) -> dict:
    """Right-padded batch (the cartridge sits at 0..p-1, so every row starts at position p)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    keep = torch.zeros((len(examples), width), dtype=torch.bool)
    hard_keep = torch.zeros((len(examples), width), dtype=torch.bool)
    topk_ids, topk_lp, hard_targets, targets = [], [], [], []
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
        keep[row, e.positions] = True
        topk_ids.append(torch.from_numpy(np.asarray(e.topk_ids, dtype=np.int64)))
        topk_lp.append(torch.from_numpy(np.asarray(e.topk_logprobs, dtype=np.float32)))
        targets.extend(e.targets)
        if e.hard_positions:
            hard_keep[row, e.hard_positions] = True
            hard_targets.extend(e.hard_targets)
    # logits_to_keep with a boolean mask returns rows in (batch, position) order, like these concatenations.
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "keep": (keep | hard_keep).to(device),
        "is_soft": keep[keep | hard_keep].to(device),
        "topk_ids": torch.cat(topk_ids).to(device),
        "topk_logprobs": torch.cat(topk_lp).to(device),
        "hard_targets": torch.tensor(hard_targets, dtype=torch.long, device=device),
        "targets": torch.tensor(targets, dtype=torch.long, device=device),
        "n_tokens": int(mask.sum()),
    }


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Conversation indices for `step`: a stream of per-epoch permutations seeded by (seed, epoch)."""
    orders: dict[int, np.ndarray] = {}
    out = []
    for flat in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(flat, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(orders[epoch][pos]))
    return out


# ----------------------------------------------------------------------------- loss


_MASK_LOGITS_OK: bool | None = None  # does this transformers accept a boolean [batch, seq] logits_to_keep?


def _supervised_logits(peft_model, batch: dict, autocast) -> torch.Tensor:
    """Logits at the supervised positions only, [n_supervised, vocab], in (batch, position) order.

    The vocabulary projection at every position would cost more memory than the rest of the step, so
    `logits_to_keep` selects the positions: a boolean mask where transformers supports it (>= 5.2x),
    else the union of positions (a 1-D index, supported by all 5.x) followed by a gather.
    """
    global _MASK_LOGITS_OK
    keep = batch["keep"]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if _MASK_LOGITS_OK is not False:
        try:
            with autocast:
                logits = peft_model(**kwargs, logits_to_keep=keep).logits
            if logits.ndim == 2 and logits.shape[0] == int(keep.sum()):
                _MASK_LOGITS_OK = True
                return logits
        except (IndexError, TypeError, RuntimeError):
            if _MASK_LOGITS_OK:
                raise
        _MASK_LOGITS_OK = False
    columns = keep.any(dim=0).nonzero()[:, 0]
    with autocast:
        logits = peft_model(**kwargs, logits_to_keep=columns).logits  # [batch, n_columns, vocab]
    return logits[keep[:, columns]]


def distill_loss(peft_model, batch: dict, autocast) -> torch.Tensor:
    """Mean over supervised tokens of -sum_k p_teacher(k) * log p_student(k).

    p_teacher = exp(stored top-k log-probs), not renormalised: this is the cross-entropy against the
    teacher restricted to its top-k (equal to the KL up to a constant), and positions where the teacher
    spreads mass beyond its top-k simply weigh a little less.
    """
    return token_losses(peft_model, batch, autocast).mean()


def token_losses(peft_model, batch: dict, autocast) -> torch.Tensor:
    """The per-token terms of `distill_loss` (soft positions first, then hard ones)."""
    logits = _supervised_logits(peft_model, batch, autocast)
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n_supervised, vocab]
    soft = logp[batch["is_soft"]]
    per_token = -(batch["topk_logprobs"].exp() * soft.gather(-1, batch["topk_ids"])).sum(-1)
    if batch["hard_targets"].numel():
        hard = logp[~batch["is_soft"]]
        per_token = torch.cat([per_token, -hard.gather(-1, batch["hard_targets"][:, None])[:, 0]])
    return per_token


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of `step` as a share of cfg.lr: a pure function of the step, so resuming is exact."""
    if cfg.lr_schedule == "constant":
        return 1.0
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- held-out score


def heldout_count(n: int, share: float) -> int:
    return 0 if share <= 0 or n < 10 else min(32, max(2, round(n * share)))


def split_heldout(conversations: list[Conversation], share: float, seed: int) -> tuple[list, list]:
    """(training, held-out): a seeded `share` of the conversations (at least 2, at most 32; none when
    fewer than 10 or share is 0) kept out of training so the cartridge can be scored on questions it never saw."""
    n = len(conversations)
    count = heldout_count(n, share)
    if not count:
        return list(conversations), []
    held = set(np.random.default_rng([seed, 7]).choice(n, size=count, replace=False).tolist())
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


@torch.no_grad()
def _answer_nll(model, batches: list[dict], autocast) -> float:
    """Mean per-token NLL of the teacher's answer tokens under `model` (the cartridge model, or the bare base)."""
    total, count = 0.0, 0
    for batch in batches:
        logits = _supervised_logits(model, batch, autocast)
        soft = torch.log_softmax(logits.float(), dim=-1)[batch["is_soft"]]
        total += float(-soft.gather(-1, batch["targets"][:, None]).sum())
        count += int(batch["targets"].numel())
    return total / max(1, count)


def _teacher_nll(examples: list[_Example]) -> float:
    """The teacher's own NLL of its (greedy) answers, from the stored top-k rows."""
    values = []
    for e in examples:
        ids, lp = np.asarray(e.topk_ids), np.asarray(e.topk_logprobs, dtype=np.float32)
        match = ids == np.asarray(e.targets)[:, None]
        values.extend(np.where(match.any(1), -(lp * match).sum(1), -lp[:, -1]).tolist())
    return float(np.mean(values)) if values else float("nan")


# Below this teacher advantage (nats per answer token) the held-out score is noise over a near-zero
# denominator (a few short, generic answers), so no score is given.
MIN_TEACHER_GAIN = 0.05


class HeldOut:
    """Scores a cartridge on held-out conversations: `score = (none - cartridge) / (none - teacher)`,
    the share of the teacher's advantage (over the bare model) that the cartridge recovers.

    Quoting conversations among them (seed_type "verbatim") are recall probes instead: passages of the
    folder to be continued word for word. They take no part in the score, but they do in choosing the
    state to keep (`BestState`): a cartridge that learns the folder's words imitates the teacher's phrasing
    less, so the self-study NLL alone would throw that learning away."""

    def __init__(self, lm: LoadedModel, conversations: list[Conversation], cfg: TrainConfig, p: int):
        cfg = cfg.replace(loss_on="assistant")
        size = max(1, cfg.batch_size)

        def batches(kind: list[Conversation]) -> tuple[list, list[dict]]:
            examples = [e for c in kind if (e := _example(lm, c, cfg, p)) is not None]
            return examples, [_collate(examples[i:i + size], lm.pad_id, lm.device)
                              for i in range(0, len(examples), size)]

        examples, self.batches = batches([c for c in conversations if c.seed_type != "verbatim"])
        _, self.probe_batches = batches([c for c in conversations if c.seed_type == "verbatim"])
        self.autocast = lm.autocast
        self.teacher = _teacher_nll(examples)
        self.none = _answer_nll(lm.model, self.batches, lm.autocast()) if self.batches else float("nan")

    def __bool__(self) -> bool:
        return bool(self.batches)

    def nll(self, peft_model) -> float:
        return _answer_nll(peft_model, self.batches, self.autocast())

    def recall(self, peft_model) -> float | None:
        """NLL of the recall probes' passages, or None without probes."""
        return _answer_nll(peft_model, self.probe_batches, self.autocast()) if self.probe_batches else None

    def score(self, nll: float) -> float | None:
        gain = self.none - self.teacher
        return round((self.none - nll) / gain, 4) if gain >= MIN_TEACHER_GAIN else None


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_JSON = "checkpoint.json"


def _trainable(peft_model) -> torch.nn.Parameter:
    return peft_model.prompt_encoder[peft_model.active_adapter].trainable_embedding


def _encoder(peft_model):
    return peft_model.prompt_encoder[peft_model.active_adapter]


def _checkpoint_identity(cfg: TrainConfig, peft_model, lm: LoadedModel, n_conversations: int) -> dict:
    encoder = _encoder(peft_model)
    return {
        "p": encoder.num_frozen_tokens + encoder.num_trainable_tokens,
        "num_frozen_tokens": encoder.num_frozen_tokens,
        "fingerprint": lm.fingerprint,
        "n_conversations": n_conversations,
        "config": asdict(cfg),
    }


def save_checkpoint(folder: Path, step: int, peft_model, optimizer, identity: dict, losses: list[float],
                    tracker: "BestState | None" = None, average: torch.Tensor | None = None) -> None:
    """Weights + Adam moments (+ the best held-out state so far) as safetensors, then a JSON that names
    them (written last, atomically)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    param = _trainable(peft_model)
    state = optimizer.state.get(param, {})
    tensors = {"weight": _encoder(peft_model).weight.detach().float().cpu().contiguous()}
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            tensors[f"adam.{name}"] = state[name].detach().cpu().contiguous()
    if tracker is not None and tracker.weight is not None:
        tensors["best.weight"] = tracker.weight.contiguous()
    if average is not None:
        tensors["ema.weight"] = average.detach().cpu().contiguous()
    name = f"ckpt-{step:07d}.safetensors"
    save_file(tensors, str(folder / name))
    meta = {**identity, "step": step, "adam_step": float(state["step"]) if "step" in state else 0.0,
            "weights": name, "losses": losses, "heldout": tracker.to_json() if tracker is not None else None}
    tmp = folder / f".{CHECKPOINT_JSON}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, folder / CHECKPOINT_JSON)
    for old in folder.glob("ckpt-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path, peft_model, optimizer, identity: dict,
                    tracker: "BestState | None" = None, average: torch.Tensor | None = None) -> tuple[int, list[float]]:
    """Restore weights, Adam state, the best held-out state and the moving average (into `average`); returns
    (step, losses). No checkpoint: (0, [])."""
    from safetensors.torch import load_file

    path = folder / CHECKPOINT_JSON
    if not path.is_file():
        return 0, []
    try:
        meta = json.loads(path.read_text())
        tensors = load_file(str(folder / meta["weights"]))
    except Exception as exc:
        raise UserError(f"cannot resume: unreadable checkpoint in {folder} ({type(exc).__name__})") from None
    for key in ("p", "num_frozen_tokens", "fingerprint", "n_conversations"):
        if meta.get(key) != identity[key]:
            raise UserError(f"cannot resume: the checkpoint in {folder} has a different {key}; start a fresh run")
    for key in ("batch_size", "lr", "seed", "loss_on", "max_tokens", "lr_schedule", "warmup"):
        if meta["config"].get(key) != identity["config"][key]:
            raise UserError(f"cannot resume: the checkpoint in {folder} used a different {key}; start a fresh run")
    param = _trainable(peft_model)
    _encoder(peft_model).load_prompt_embeddings(tensors["weight"])
    if "adam.exp_avg" in tensors:
        optimizer.state[param] = {
            "step": torch.tensor(meta["adam_step"], dtype=torch.float32),
            "exp_avg": tensors["adam.exp_avg"].to(param.device),
            "exp_avg_sq": tensors["adam.exp_avg_sq"].to(param.device),
        }
    if tracker is not None and meta.get("heldout"):
        tracker.restore(meta["heldout"], tensors.get("best.weight"))
    if average is not None:
        average.copy_(tensors["ema.weight"] if "ema.weight" in tensors else param.detach())
    return int(meta["step"]), list(meta.get("losses", []))


def _criterion(nll: float, recall: float | None) -> float:
    """What the kept state is chosen on: the held-out answers' NLL, averaged with the probes' when there are any."""
    return nll if recall is None else (nll + recall) / 2


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


class BestState:
    """The cartridge state with the lowest held-out NLL seen so far (the initialisation included), so that
    training can never hand back a cartridge worse than the one it started from. With recall probes, the
    NLL compared is the mean of the held-out answers' and the probes' (see `HeldOut`)."""

    def __init__(self, heldout: HeldOut | None):
        self.heldout = heldout
        self.nll: float | None = None  # held-out answers' NLL of the kept state
        self.init: float | None = None
        self.recall: float | None = None  # the kept state's probe NLL (None without probes)
        self.recall_init: float | None = None
        self.step = 0
        self.weight: torch.Tensor | None = None
        self.curve: list[list[float]] = []  # [step, held-out nll] (+ probe nll)

    def observe(self, step: int, peft_model) -> float | None:
        if not self.heldout:
            return None
        nll, recall = self.heldout.nll(peft_model), self.heldout.recall(peft_model)
        criterion = _criterion(nll, recall)
        self.curve.append([step, round(nll, 5)] + ([] if recall is None else [round(recall, 5)]))
        if self.init is None:
            self.init, self.recall_init = nll, recall
        if self.nll is None or criterion < _criterion(self.nll, self.recall):
            self.nll, self.recall, self.step = nll, recall, step
            self.weight = _encoder(peft_model).weight.detach().float().cpu().clone()
        return nll

    def apply(self, peft_model) -> None:
        if self.weight is not None:
            _encoder(peft_model).load_prompt_embeddings(self.weight)

    def to_json(self) -> dict | None:
        if not self.heldout or self.nll is None:
            return None
        h = self.heldout
        return {"score": h.score(self.nll), "nll_none": round(h.none, 5), "nll_teacher": round(h.teacher, 5),
                "nll_init": round(self.init, 5), "nll_cartridge": round(self.nll, 5), "init_score": h.score(self.init),
                "best_step": self.step, "conversations": sum(int(b["input_ids"].shape[0]) for b in h.batches),
                "recall_probes": sum(int(b["input_ids"].shape[0]) for b in h.probe_batches),
                "recall_init": _rounded(self.recall_init), "recall": _rounded(self.recall),
                "criterion": round(_criterion(self.nll, self.recall), 5), "curve": self.curve}

    def restore(self, saved: dict, weight: torch.Tensor | None) -> None:
        self.nll, self.init, self.step = saved["nll_cartridge"], saved["nll_init"], saved["best_step"]
        self.recall, self.recall_init = saved.get("recall"), saved.get("recall_init")
        self.curve = [list(c) for c in saved.get("curve", [])]
        self.weight = weight.float() if weight is not None else None


# ----------------------------------------------------------------------------- loop


def distill(
    peft_model,
    lm: LoadedModel,
    conversations: list[Conversation],
    cfg: TrainConfig,
    *,
    on_step: Callable[[StepMetrics], None] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
    heldout: list[Conversation] | None = None,
    parallel: "DataParallel | None" = None,
) -> TrainResult:
    """Train the cartridge of `peft_model` on self-study conversations; returns what was done.

    `should_stop()` is checked before every step (and Ctrl-C is caught): the loop then saves a
    checkpoint (if it has a folder) and returns with `stopped=True`. With `heldout` conversations, the
    cartridge is scored on them before training, every `cfg.eval_every` steps and at the end, and the
    best-scoring state is the one left in `peft_model`. With `parallel` (one of several processes, see
    engine.training.distributed), each step's batch is split between the processes and their gradients are
    averaged, so the steps are those of one process with the whole batch; only rank 0 writes checkpoints.
    """
    if cfg.loss_on not in LOSS_ON:
        raise UserError(f"loss_on must be one of {LOSS_ON}, got {cfg.loss_on!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    p = _encoder(peft_model).num_frozen_tokens + _encoder(peft_model).num_trainable_tokens
    examples = [e for c in conversations if (e := _example(lm, c, cfg, p)) is not None]
    if not examples:
        raise UserError("no usable training conversations")
    total = cfg.total_steps(len(examples))
    param = _trainable(peft_model)
    param.requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=cfg.lr, weight_decay=0.0)
    identity = _checkpoint_identity(cfg, peft_model, lm, len(examples))
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    pad_id = lm.pad_id
    tracker = BestState(HeldOut(lm, heldout, cfg, p) if heldout else None)
    average = param.detach().float().clone() if cfg.ema > 0 else None
    start, losses = (0, [])
    if resume and checkpoint_dir is not None:
        start, losses = load_checkpoint(checkpoint_dir, peft_model, optimizer, identity, tracker, average)

    def observe(step: int) -> None:
        """Score the state training hands back: the moving average when there is one."""
        if average is None:
            tracker.observe(step, peft_model)
            return
        current = param.detach().clone()
        param.data.copy_(average)
        tracker.observe(step, peft_model)
        param.data.copy_(current)

    peft_model.eval()  # no dropout: the only thing that learns is the cartridge
    if start == 0:
        observe(0)
    writes = parallel is None or parallel.rank == 0
    checkpoints = checkpoint_dir if writes else None
    began = saved = time.perf_counter()
    tokens_seen = 0
    step = start
    stopped = False
    try:
        while step < total:
            if should_stop is not None and should_stop():
                stopped = True
                break
            indices = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
            if parallel is not None:
                indices = indices[parallel.rank::parallel.world]
            batch = _collate([examples[i] for i in indices], pad_id, lm.device)
            optimizer.zero_grad(set_to_none=True)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, step, total)
            if parallel is None:
                loss = distill_loss(peft_model, batch, lm.autocast())
                loss.backward()
                loss, n_tokens = float(loss.detach()), batch["n_tokens"]
            else:
                loss, n_tokens = parallel.backward(batch, lm.autocast(), param)
            optimizer.step()
            if average is not None:
                average.lerp_(param.detach().float(), 1.0 - cfg.ema)
            step += 1
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                observe(step)
            losses.append(loss)
            tokens_seen += n_tokens
            elapsed = time.perf_counter() - began
            if on_step is not None:
                done = step - start
                on_step(StepMetrics(step=step, total_steps=total, loss=losses[-1], tokens_per_s=tokens_seen / elapsed,
                                    lr=optimizer.param_groups[0]["lr"], elapsed_s=elapsed,
                                    eta_s=elapsed / done * (total - step)))
            if (checkpoints is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                    and time.perf_counter() - saved >= cfg.checkpoint_min_s):
                save_checkpoint(checkpoints, step, peft_model, optimizer, identity, losses, tracker, average)
                saved = time.perf_counter()
    except KeyboardInterrupt:
        stopped = True
    if stopped and checkpoints is not None and step > start:
        save_checkpoint(checkpoints, step, peft_model, optimizer, identity, losses, tracker, average)
    if not stopped:
        if average is not None:
            param.data.copy_(average)
        if tracker.heldout and (not tracker.curve or tracker.curve[-1][0] != step):
            tracker.observe(step, peft_model)
        tracker.apply(peft_model)
    seconds = time.perf_counter() - began
    head, tail = losses[:5], losses[-5:]
    return TrainResult(
        loss_first=float(np.mean(head)) if head else float("nan"),
        loss_last=float(np.mean(tail)) if tail else float("nan"),
        steps=step,
        seconds=seconds,
        tokens_per_s=tokens_seen / seconds if seconds > 0 else 0.0,
        stopped=stopped,
        losses=losses,
        heldout=tracker.to_json(),
    )
