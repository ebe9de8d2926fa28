"""The base model: device choice, loading, fingerprint, and the one prompt format.

Every part of the engine that turns a conversation into token ids (synthesis, training, chat, eval)
goes through `chat_ids`, so the cartridge always sees at inference the exact format it was trained on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import UserError
from engine.store.paths import cache_dir, default_model_path
from engine.engines.tokenizer import is_default, load_tokenizer

DEVICES = ("auto", "cpu", "cuda", "mps")

CONTEXT_SYSTEM_PROMPT = (
    "You are in a conversation about the following user information.\n\n<info>\n{text}\n</info>"
)


def context_system_prompt(text: str) -> str:
    """The system prompt that puts corpus text in context (teacher in self-study, ICL baseline)."""
    return CONTEXT_SYSTEM_PROMPT.format(text=text)


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` in the model's chat template.

    The template is rendered to text and tokenized without special tokens, so a template that already
    writes its BOS gets exactly one (tokenizing with special tokens would add a second).
    """
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_SYSTEM_MARK, _USER_MARK = "\u27e6system\u27e7", "\u27e6user\u27e7"


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template writes when a conversation has none (SmolLM2's "You are a helpful
    AI assistant named SmolLM..."), or None when it writes none.

    Found by rendering a conversation without a system turn and one with a marked system turn: what differs
    is the system turn, and the default is kept only if a system turn holding it renders exactly like the
    template's own."""
    user = [{"role": "user", "content": _USER_MARK}]
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        own = tokenizer.apply_chat_template([{"role": "system", "content": _SYSTEM_MARK}] + user, tokenize=False)
    except Exception:  # a template without system turns, or none at all
        return None
    shared = 0
    while shared < min(len(bare), len(own)) and bare[-1 - shared] == own[-1 - shared]:
        shared += 1
    bare_head, own_head = bare[:len(bare) - shared], own[:len(own) - shared]
    if own_head.count(_SYSTEM_MARK) != 1:
        return None
    before, after = own_head.split(_SYSTEM_MARK)
    if not (bare_head.startswith(before) and bare_head.endswith(after)) or len(bare_head) <= len(before) + len(after):
        return None
    text = bare_head[len(before):len(bare_head) - len(after)]
    same = tokenizer.apply_chat_template([{"role": "system", "content": text}] + user, tokenize=False) == bare
    return text if same else None


def passages_messages(tokenizer, passages: str, messages: list[dict], *, after_cartridge: bool) -> list[dict]:
    """`messages` (without their system turns) after a system turn holding retrieved `passages` (rag modes).

    After a cartridge, the template's default system turn stays in front of the passages: the cartridge was
    trained with that turn right behind it. On the sample, cartridge+rag answered 25 of 36 questions this way
    against 19 with the passages in its place (see the README). Templates that refuse a second system turn
    get the passages' turn alone."""
    turns = [{"role": "system", "content": passages}] + [m for m in messages if m["role"] != "system"]
    default = default_system_prompt(tokenizer) if after_cartridge else None
    if default is None:
        return turns
    kept = [{"role": "system", "content": default}] + turns
    try:
        tokenizer.apply_chat_template(kept, tokenize=False)
    except Exception:
        return turns
    return kept


# ----------------------------------------------------------------------------- devices


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def _mps_ok() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(requested: str | None = None) -> torch.device:
    """The device to run on: CUDA, else Apple MPS, else CPU; `requested` forces one."""
    req = (requested or "auto").lower()
    if req not in DEVICES:
        raise UserError(f"unknown device {requested!r}: use one of {', '.join(DEVICES)}")
    if req == "auto":
        if _cuda_ok():
            return torch.device("cuda")
        if _mps_ok():
            return torch.device("mps")
        return torch.device("cpu")
    if req == "cuda" and not _cuda_ok():
        raise UserError("device cuda was requested but no CUDA GPU is available to torch")
    if req == "mps" and not _mps_ok():
        raise UserError("device mps was requested but Apple MPS is not available to torch")
    return torch.device(req)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX512-BF16 / AMX): there bf16 autocast is ~2x faster.

    `CARTRIDGE_CPU_BF16=0/1` overrides the detection.
    """
    env = os.environ.get("CARTRIDGE_CPU_BF16")
    if env in ("0", "1"):
        return env == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _dtypes_for(device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype) for a device."""
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
    if device.type == "cpu" and cpu_has_fast_bf16():
        # fp32 weights keep the cartridge gradients in fp32; autocast runs the matmuls in bf16.
        return torch.float32, torch.bfloat16
    return torch.float32, None


# ----------------------------------------------------------------------------- loaded model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str
    fingerprint: str
    device: torch.device
    autocast_dtype: torch.dtype | None
    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_positions: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def pad_id(self) -> int:
        """What batches are padded with: the tokenizer's pad token, else its end of sequence."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def autocast(self):
        """A context manager for the forward passes: bf16 autocast where that is faster, else a no-op."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def loaded_model_from(
    model, tokenizer, *, spec: str, fingerprint: str, autocast_dtype: torch.dtype | None = None
) -> LoadedModel:
    """Wrap an already-built causal LM and tokenizer (tests, callers that load models themselves)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        fingerprint=fingerprint,
        device=next(model.parameters()).device,
        autocast_dtype=autocast_dtype,
        n_layers=cfg.num_hidden_layers,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        max_positions=getattr(cfg, "max_position_embeddings", None) or 2048,
    )


def load_model(spec: str | None = None, device: str | None = None) -> LoadedModel:
    """Load the base model once per (spec, device); None/"default" is the bundled SmolLM2 GGUF."""
    spec_key = "default" if is_default(spec) else str(spec)
    dev = resolve_device(device)
    return _load_model_cached(spec_key, str(dev))


@functools.lru_cache(maxsize=2)
def _load_model_cached(spec: str, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading takes a second; the app reports its own phases

    dev = torch.device(device)
    weight_dtype, autocast_dtype = _dtypes_for(dev)
    if spec == "default":
        gguf = default_model_path()
        model = _load_default_model(gguf)
        tokenizer = load_tokenizer(None)
        fingerprint = gguf_fingerprint(gguf)
    else:
        trust = os.environ.get("CARTRIDGE_TRUST_REMOTE_CODE") == "1"
        _check_supported(spec, trust)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=weight_dtype, trust_remote_code=trust)
            tokenizer = load_tokenizer(spec)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from exc
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"model {spec!r} has no chat template: use an instruct/chat model")
        try:  # the corpus goes into a system message (initialisation, self-study, ICL)
            chat_ids(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], True)
        except Exception as exc:
            raise UserError(f"model {spec!r}: its chat template does not accept a system message ({exc})") from None
        fingerprint = hf_fingerprint(spec)
    model = model.to(device=dev, dtype=weight_dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded_model_from(
        model, tokenizer, spec=spec, fingerprint=fingerprint, autocast_dtype=autocast_dtype
    )


def _load_default_model(gguf: Path):
    """The GGUF dequantised to fp32, through a safetensors copy in the data home.

    Parsing and dequantising the GGUF takes ~18 s on 2 cores; the cached copy (~0.5 GB) loads in
    well under a second. `CARTRIDGE_MODEL_CACHE=0` skips the cache.
    """
    from transformers import AutoModelForCausalLM

    if os.environ.get("CARTRIDGE_MODEL_CACHE") == "0":
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    stat = gguf.stat()
    cache = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (cache / "model.safetensors").is_file():
        try:
            return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
        except Exception:  # a damaged cache is rebuilt below
            pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    try:
        _write_model_cache(model, cache)
    except OSError:
        pass  # a read-only or full disk only costs load time
    return model


def _write_model_cache(model, cache: Path) -> None:
    import shutil

    from safetensors.torch import save_model

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for old in cache.parent.glob(cache.name.rsplit("-", 2)[0] + "-*"):
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_supported(spec: str, trust: bool) -> None:
    """Refuse models whose attention is not full causal attention: a cartridge must be seen by every layer."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UserError(f"model {spec!r} uses sliding-window or mixed attention, which cartridges do not support")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise UserError(f"model {spec!r} uses sliding-window attention, which cartridges do not support")
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model {spec!r} is an encoder-decoder model; a causal LM is needed")


# ----------------------------------------------------------------------------- fingerprints


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_fingerprint(path: Path) -> str:
    """`<file name>@sha256:<hex>`; the hash is cached by (path, size, mtime) because hashing takes seconds."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = _sha256_file(path)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".fingerprints-")
        with os.fdopen(fd, "w") as fh:
            json.dump(cache, fh, indent=1)
        os.replace(tmp, cache_file)
    return f"{path.name}@sha256:{cache[key]}"


FINGERPRINT_SAMPLES = 64  # blocks read from each weight file
FINGERPRINT_BLOCK = 4096


def _sampled_digest(path: Path) -> str:
    """A digest of blocks read at evenly spaced places of a weight file: two fine-tunes of one model have
    the same names and sizes, but not the same bytes, and hashing gigabytes on every load would be slow."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for i in range(FINGERPRINT_SAMPLES):
            fh.seek(size * i // FINGERPRINT_SAMPLES)
            digest.update(fh.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def hf_fingerprint(spec: str) -> str:
    """`<spec>@sha256:<hex>` over config.json and the snapshot's sorted weight files (name, size, and a
    digest of blocks sampled across each)."""
    from transformers.utils import cached_file

    config_path = cached_file(spec, "config.json")
    if config_path is None:
        raise UserError(f"model {spec!r} has no config.json")
    folder = Path(config_path).parent
    digest = hashlib.sha256(Path(config_path).read_bytes())
    weights = sorted(
        (p.name, p.stat().st_size, _sampled_digest(p))
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")
    )
    digest.update(json.dumps(weights).encode())
    # A local folder is named by its base name, so moving the folder keeps its cartridges usable.
    name = Path(spec).name if Path(spec).is_dir() else spec
    return f"{name}@sha256:{digest.hexdigest()}"
