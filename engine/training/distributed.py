"""Distillation across processes with torch DDP: gloo between CPU processes, NCCL with one GPU per process.

The app's process plans and synthesizes as usual, then `distill_across` starts N training processes.
Each loads the model, starts from the same cartridge and trains on its share of every step's batch; DDP
averages the gradients, rescaled here so that a step equals one process's step on the whole batch (the
loss is a mean over the batch's tokens, which the shares split unevenly). Rank 0 sends progress back,
writes checkpoints and hands the final cartridge to the parent, which alone writes the registry.
"""

from __future__ import annotations

import json
import os
import queue as queue_module
import re
import signal
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from engine.errors import UserError


class DataParallel:
    """One process's part of a data-parallel step (see training.distill's `parallel`)."""

    def __init__(self, peft_model, rank: int, world: int):
        from torch.nn.parallel import DistributedDataParallel

        self.rank, self.world = rank, world
        device = next(peft_model.parameters()).device
        self.device = device
        self.model = DistributedDataParallel(peft_model, device_ids=[device.index] if device.type == "cuda" else None)

    def backward(self, batch: dict, autocast, param: torch.Tensor) -> tuple[float, int]:
        """Gradient of the mean loss over all processes' tokens into `param.grad`; returns (that mean, tokens)."""
        from engine.training.distill import token_losses

        per_token = token_losses(self.model, batch, autocast)
        per_token.sum().backward()  # DDP leaves the mean over processes of each one's gradient of its sum
        totals = torch.tensor([float(per_token.detach().sum()), per_token.numel(), batch["n_tokens"]],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        param.grad.mul_(self.world / float(totals[1]))
        return float(totals[0] / totals[1]), int(totals[2])

    def agree(self, flag: bool) -> bool:
        """True on every process when it is true on any (so that all stop at the same step)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)


def check(nproc: int, batch_size: int, device_type: str) -> None:
    """Refuse, before any work, a process count this run cannot use."""
    if batch_size < nproc:
        raise UserError(f"a batch of {batch_size} cannot be split between {nproc} processes; "
                        f"use --batch-size {nproc} or more")
    if device_type == "cuda" and torch.cuda.device_count() < nproc:
        raise UserError(f"--nproc {nproc} needs {nproc} GPUs; this machine has {torch.cuda.device_count()}")
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"training across processes runs on CPUs or CUDA GPUs, not {device_type}")


def _loopback_interface() -> str | None:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS), if there is one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in names if n in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), None))


def join_group(rank: int, world: int, rendezvous: Path, backend: str) -> None:
    """Join the processes' group on this machine only. The processes meet through a file (a TCP rendezvous
    would start a store listening on every network interface), and gloo's and NCCL's own connections are
    kept on the loopback interface unless the user chose one."""
    loopback = _loopback_interface()
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    dist.init_process_group(backend, init_method=Path(rendezvous).resolve().as_uri(), rank=rank, world_size=world)


def _worker(rank: int, world: int, rendezvous: str, job: dict, progress, stop) -> None:
    from safetensors.torch import load_file, save_file

    from engine.cartridge.format import cartridge_embeddings, create_cartridge_model
    from engine.engines.models import load_model
    from engine.quiet import quiet_third_party
    from engine.training.distill import distill

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into a stop at the next step
    quiet_third_party()
    cuda = job["device"].startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    join_group(rank, world, Path(rendezvous), "nccl" if cuda else "gloo")
    try:
        lm = load_model(job["model"], f"cuda:{rank}" if cuda else "cpu")
        start = load_file(job["start"])["embeddings"]
        peft_model = create_cartridge_model(lm, start.shape[0], embeddings=start)
        parallel = DataParallel(peft_model, rank, world)
        result = distill(peft_model, lm, job["conversations"], job["cfg"],
                         on_step=progress.put if rank == 0 else None,
                         checkpoint_dir=job["checkpoint_dir"], resume=job["resume"],
                         should_stop=lambda: parallel.agree(stop.is_set()), heldout=job["heldout"],
                         parallel=parallel)
        if rank == 0:
            out = Path(job["out"])
            save_file({"embeddings": cartridge_embeddings(peft_model).contiguous()}, str(out / "final.safetensors"))
            (out / "result.json").write_text(json.dumps(asdict(result)))
    finally:
        dist.destroy_process_group()


def distill_across(nproc: int, peft_model, lm, model: str | None, conversations: list, cfg, *,
                   on_step: Callable | None = None, checkpoint_dir: Path | None = None, resume: bool = False,
                   should_stop: Callable[[], bool] | None = None, heldout: list | None = None):
    """training.distill in `nproc` processes; the trained (best held-out) cartridge is loaded into `peft_model`."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file, save_file

    from engine.cartridge.format import cartridge_embeddings
    from engine.training.distill import TrainResult

    check(nproc, cfg.batch_size, lm.device.type)
    context = mp.get_context("spawn")
    progress, stop = context.Queue(), context.Event()
    with tempfile.TemporaryDirectory(prefix="cartridge-ddp-") as tmp:
        start = Path(tmp) / "start.safetensors"
        save_file({"embeddings": cartridge_embeddings(peft_model).contiguous()}, str(start))
        job = {"model": model, "device": lm.device.type, "start": str(start), "conversations": conversations,
               "cfg": cfg, "heldout": heldout, "resume": resume, "out": tmp,
               "checkpoint_dir": Path(checkpoint_dir) if checkpoint_dir is not None else None}
        rendezvous = str(Path(tmp) / "rendezvous")
        processes = mp.start_processes(_worker, args=(nproc, rendezvous, job, progress, stop), nprocs=nproc,
                                       join=False, start_method="spawn")

        def relay() -> None:
            while True:
                try:
                    metrics = progress.get_nowait()
                except queue_module.Empty:
                    return
                if on_step is not None:
                    on_step(metrics)

        try:
            while True:
                try:
                    if processes.join(timeout=0.2):
                        break
                except KeyboardInterrupt:
                    stop.set()  # the processes stop together at the next step and checkpoint
                    continue
                except mp.ProcessRaisedException as exc:
                    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                    last = re.sub(r"^[\w.]+: ", "", lines[-1]) if lines else str(exc)  # drop the exception's class
                    raise UserError(f"a training process failed: {last}") from None
                relay()
                if should_stop is not None and should_stop():
                    stop.set()
        finally:
            for process in processes.processes:
                if process.is_alive():
                    process.kill()
        relay()
        result_file = Path(tmp) / "result.json"
        if not result_file.exists():
            raise UserError("the training processes ended without a result")
        result = TrainResult(**json.loads(result_file.read_text()))
        if not result.stopped:
            weight = load_file(str(Path(tmp) / "final.safetensors"))["embeddings"]
            peft_model.prompt_encoder[peft_model.active_adapter].load_prompt_embeddings(weight)
    return result
