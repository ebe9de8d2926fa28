"""A cartridge: a trained KV prefix of p virtual tokens, its PEFT model, and its folder on disk.

Layout of the embeddings tensor (PEFT's CartridgeEncoder): `[p, n_layers * 2 * n_kv_heads * head_dim]`,
viewed as `[p, layer * 2 + (0 = key, 1 = value), head, head_dim]`; keys are stored after RoPE, for
positions 0..p-1, so the conversation that follows starts at position p.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.errors import CartridgeMismatch, UserError
from engine.cartridge.metadata import KV_VALUE_LIMIT, METADATA, cartridge_p
from engine.engines.models import LoadedModel, chat_ids

FORMAT = "cartridge-desktop/1"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHT_KEY = "prompt_embeddings"  # the key PEFT reads for prompt-learning adapters


@dataclass
class Cartridge:
    embeddings: torch.Tensor  # [p, hidden], float32 on cpu
    meta: dict
    folder: Path

    @property
    def p(self) -> int:
        return int(self.embeddings.shape[0])


def kv_width(lm: LoadedModel) -> int:
    """Width of one virtual token: keys and values of every layer."""
    return lm.n_layers * 2 * lm.n_kv_heads * lm.head_dim


def kv_bytes(n_tokens: int, lm: LoadedModel, bytes_per_value: int = 2) -> int:
    """KV-cache memory of n_tokens for this model (2 bytes per value: f16/bf16)."""
    return n_tokens * kv_width(lm) * bytes_per_value


# ----------------------------------------------------------------------------- creation


SPREAD_MARGIN = 16  # chat-template and excerpt-separator tokens around spread excerpts


def init_ids(lm: LoadedModel, p: int, init_text: str) -> list[int]:
    """The p token ids whose KV initialise a cartridge: `init_text` as a system message in the chat template.

    A text shorter than p tokens is repeated until it fills p: the cartridge length is fixed, and KV
    computed from real text is a far better start than the random vectors PEFT would leave in the
    remaining slots (paper: 29.9 for random vectors vs 51-55 for text initialisations).
    """
    text = init_text if init_text.strip() else "(empty)"
    ids = chat_ids(lm.tokenizer, [{"role": "system", "content": text}], add_generation_prompt=False)
    repeated = text
    while len(ids) < p:
        repeated = repeated + "\n\n" + text
        ids = chat_ids(lm.tokenizer, [{"role": "system", "content": repeated}], add_generation_prompt=False)
    return ids[:p]


def corpus_init_text(sampler, p: int, how: str = "first") -> str:
    """The corpus text a cartridge of p tokens starts from: the corpus's beginning ("first", twice p tokens
    long so that after the chat template's own tokens `init_ids` still has p to keep), or excerpts from
    across it ("spread", sized to fit p with the template, so that the last excerpt is not cut away)."""
    if how == "spread":
        return sampler.spread(max(1, p - SPREAD_MARGIN))
    if how != "first":
        raise UserError(f"unknown cartridge initialisation {how!r} (choose first, spread or attention)")
    return sampler.prefix(p * 2)


@torch.no_grad()
def prefix_embeddings(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """The KV of `ids` packed like a cartridge ([n, layers*2*heads*head_dim]), to reuse one prefill many times."""
    with lm.autocast():
        out = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True)
    cache = out.cache
    layers = [(cache.layers[i].keys, cache.layers[i].values) for i in range(lm.n_layers)]
    packed = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])  # [L, 2, H, n, D]
    return packed.permute(3, 0, 1, 2, 4).reshape(len(ids), -1).float().cpu()


def init_embeddings(lm: LoadedModel, sampler, p: int, how: str = "first") -> torch.Tensor:
    """The untrained cartridge: the KV of the corpus's first p tokens ("first"), of excerpts from across it
    ("spread"), or of the p positions per KV head that the corpus read whole attends to most ("attention",
    see engine.cartridge.kv_select; read in windows for a corpus longer than the model's context, and spread
    for one shorter than p)."""
    if how == "attention":
        from engine.cartridge.kv_select import attention_selected

        selected = attention_selected(lm, sampler, p)
        if selected is not None:
            return selected
        how = "spread"
    return prefix_embeddings(lm, init_ids(lm, p, corpus_init_text(sampler, p, how)))


def peft_config_for(p: int, num_frozen_tokens: int = 1):
    from peft import CartridgeConfig

    return CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, num_frozen_tokens=num_frozen_tokens)


def create_cartridge_model(lm: LoadedModel, p: int, init_text: str | None = None, *, embeddings=None):
    """A trainable PEFT cartridge model over `lm.model`, initialised from text (or given embeddings).

    The initialisation prefills only the p init tokens (the same thing as PEFT's
    `initialize_kv_prefix_from_text(..., max_length=p)`, but through `chat_ids`, the prompt format
    used everywhere else). The first token stays frozen: it is the attention sink.
    """
    from peft import get_peft_model
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values

    if p < 2:
        raise ValueError("a cartridge needs at least 2 virtual tokens (one frozen sink + one trainable)")
    peft_model = get_peft_model(lm.model, peft_config_for(p))
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    if embeddings is not None:
        encoder.load_prompt_embeddings(embeddings.float())
    elif init_text is not None:
        ids = torch.tensor([init_ids(lm, p, init_text)], device=lm.device)
        with torch.no_grad(), peft_model.disable_adapter():
            out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        initialize_kv_prefix_from_past_key_values(peft_model, past_key_values=out.cache)
    encoder.float()  # trainable state in fp32 even over a bf16 model; PEFT casts it per forward
    return peft_model


def out_of_range(embeddings) -> bool:
    """True when the KV holds NaN, infinite values, or values beyond float16's range: a diverged training
    run (the bundled model's trained cartridges measured here stay under 30)."""
    values = torch.as_tensor(embeddings)
    return not bool(torch.isfinite(values).all()) or float(values.abs().max()) > KV_VALUE_LIMIT


def cartridge_embeddings(peft_model) -> torch.Tensor:
    """The full [p, hidden] tensor: frozen sink + trainable tokens (the trainable parameter alone lacks the sink)."""
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    return encoder.weight.detach().float().cpu().clone()


# ----------------------------------------------------------------------------- disk


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_fsync(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_cartridge(embeddings: torch.Tensor, peft_config, folder: Path, metadata: dict) -> Path:
    """Write a PEFT-loadable adapter plus `cartridge.json`, atomically (temp sibling folder, then rename).

    `embeddings` must be the full tensor (frozen + trainable), see `cartridge_embeddings`.
    `metadata` supplies base_model, fingerprint, corpus, version, manifest_hash, training, metrics...
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    emb = embeddings.detach().float().cpu().contiguous()
    config = replace(peft_config, num_virtual_tokens=int(emb.shape[0]), inference_mode=True)
    meta = {"format": FORMAT, **metadata, "p": int(emb.shape[0])}

    for stale in folder.parent.glob(f".{folder.name}.*-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config_dict = config.to_dict()
        _write_fsync(tmp / ADAPTER_CONFIG, json.dumps(config_dict, indent=2, default=str).encode())
        save_file({WEIGHT_KEY: emb}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(tmp / ADAPTER_WEIGHTS, "rb+") as fh:
            os.fsync(fh.fileno())
        _write_fsync(tmp / METADATA, json.dumps(meta, indent=2, default=str).encode())
        _fsync_dir(tmp)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _short(fingerprint: str) -> str:
    name, _, digest = str(fingerprint).partition("@sha256:")
    return f"{name}@{digest[:12]}" if digest else name


def load_cartridge(folder: Path, lm: LoadedModel) -> Cartridge:
    """Read a cartridge folder made for `lm`; anything else is refused with a one-line CartridgeMismatch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CartridgeMismatch(f"not a cartridge: {folder} does not exist")
    try:
        meta = json.loads((folder / METADATA).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{METADATA} has no {FORMAT!r} format tag")
        json.loads((folder / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
        embeddings = tensors[WEIGHT_KEY]
    except (OSError, ValueError, KeyError) as exc:
        raise CartridgeMismatch(f"not a cartridge: {folder} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise CartridgeMismatch(f"not a cartridge: {folder} (unreadable {ADAPTER_WEIGHTS}: {type(exc).__name__})")
    if meta.get("fingerprint") != lm.fingerprint:
        raise CartridgeMismatch(
            f"cartridge {folder.name} was made for model {_short(meta.get('fingerprint', '?'))}, "
            f"not {_short(lm.fingerprint)}"
        )
    p = cartridge_p(meta)
    if p is None:
        raise CartridgeMismatch(f"not a cartridge: {folder} ({METADATA} gives no positive whole number p)")
    want = (p, kv_width(lm))
    if embeddings.ndim != 2 or tuple(embeddings.shape) != want:
        raise CartridgeMismatch(
            f"cartridge {folder.name} has shape {tuple(embeddings.shape)}, expected {want} for this model"
        )
    if out_of_range(embeddings):
        raise CartridgeMismatch(f"cartridge {folder.name} holds NaN or infinite values, or values too large for a "
                                "KV cache (training diverged): retrain it")
    return Cartridge(embeddings=embeddings.float().cpu(), meta=meta, folder=folder)


def content_key(folder: Path) -> str:
    """A digest of a cartridge's weights: what a loaded copy is keyed by (a retrain may reuse a path)."""
    digest = hashlib.sha256()
    try:
        with open(Path(folder) / ADAPTER_WEIGHTS, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()


# ----------------------------------------------------------------------------- use


def compose(cartridges: list[Cartridge]) -> torch.Tensor:
    """Concatenate cartridges along p, keeping only the first one's sink token; no re-rotation (paper)."""
    if not cartridges:
        raise ValueError("nothing to compose")
    parts = [cartridges[0].embeddings] + [c.embeddings[1:] for c in cartridges[1:]]
    return torch.cat(parts, dim=0)


def to_cache(embeddings: torch.Tensor, lm: LoadedModel, batch_size: int = 1):
    """A fresh DynamicCache holding the cartridge, in the model's dtype and device.

    transformers takes the cache length as the first position, so the tokens fed next sit at p, p+1, ...
    Build a new cache per conversation: the model appends to it in place.
    """
    from transformers import DynamicCache

    p = embeddings.shape[0]
    kv = embeddings.to(device=lm.device, dtype=lm.dtype).view(p, lm.n_layers * 2, lm.n_kv_heads, lm.head_dim)
    kv = kv.permute(1, 2, 0, 3)  # [layers*2, heads, p, head_dim]
    layers = []
    for layer in range(lm.n_layers):
        key = kv[2 * layer].unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()
        value = kv[2 * layer + 1].unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()
        layers.append((key, value))
    return DynamicCache(ddp_cache_data=layers)
