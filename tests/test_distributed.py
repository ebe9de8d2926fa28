"""Training across processes: two real CPU processes with gloo train the cartridge one process would,
stopped and resumed on the way."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import ASSETS, run_cli, write
from engine.training import pipeline
from engine.store import registry
from engine.cartridge.format import WEIGHT_KEY

# Real self-study of 12 conversations (2 held out), then 6 steps of 4 conversations.
SETTINGS = dict(p=16, conversations=12, steps=6, batch_size=4, chunk_tokens=96, max_user_tokens=32,
                max_answer_tokens=32, checkpoint_every=1, init="spread")
# A batch split in two is padded differently and summed in another order: in float32 that moves the
# losses by ~1e-6, but CPUs with fast bf16 run the matmuls in bf16 (models._dtypes_for), which moves them
# by up to ~2e-3 (relative) over these steps.
TOLERANCE = 1e-2


def curve(db, run_id: int) -> list[float]:
    by_step = {m["step"]: m["loss"] for m in registry.run_metrics(db, run_id, "training")}
    return [by_step[s] for s in sorted(by_step)]


def weights(outcome) -> object:
    return load_file(f"{outcome.cartridge}/adapter_model.safetensors")


def test_two_processes_stopped_and_resumed_train_what_one_process_trains(tmp_path, db):
    root = tmp_path / "notes"
    write(root, "handbook.md", (ASSETS / "sample" / "handbook.md").read_text())
    from engine.corpus.ingest import ingest

    ingest(root, db=db)
    seen = {"steps": 0}

    def count(progress):
        if progress.phase == "training":
            seen["steps"] = progress.done

    # Two processes, stopped by the user after their first steps (as the UI's stop does) ...
    assert pipeline.train(db, "notes", nproc=2, on_progress=count, should_stop=lambda: seen["steps"] >= 2,
                          **SETTINGS) is None
    run = registry.list_runs(db, registry.get_corpus(db, "notes")["id"])[-1]
    assert run["status"] == "cancelled" and 2 <= len(curve(db, run["id"])) < 6
    # ... then resumed from rank 0's checkpoint, still in two processes.
    parallel = pipeline.train(db, "notes", nproc=2, resume=True)
    assert parallel.run_id == run["id"] and parallel.steps == 6
    parallel_curve, parallel_weights = curve(db, run["id"]), weights(parallel)

    # One process on the same conversations (the version keeps them) and the same settings.
    single = pipeline.train(db, "notes", **SETTINGS)
    assert single.steps == 6 and single.conversations == parallel.conversations == 10
    single_curve = curve(db, single.run_id)
    assert len(parallel_curve) == len(single_curve) == 6
    assert parallel_curve == pytest.approx(single_curve, rel=TOLERANCE), (parallel_curve, single_curve)
    assert single_curve[0] != pytest.approx(single_curve[-1], rel=TOLERANCE)  # it did learn something
    a, b = parallel_weights[WEIGHT_KEY], weights(single)[WEIGHT_KEY]
    print("largest weight difference", float((a - b).abs().max()), "largest weight", float(b.abs().max()))
    assert float((a - b).abs().max()) < TOLERANCE * float(b.abs().max())


def test_nproc_needs_a_batch_to_split(tmp_path, cartridge_home):
    root = tmp_path / "notes"
    write(root, "a.md", "The workshop opens at nine on Saturdays.\n" * 20)
    assert run_cli("ingest", str(root), env_home=cartridge_home).returncode == 0
    proc = run_cli("train", "notes", "--nproc", "4", "--batch-size", "2", "--conversations", "2", "--tokens", "8",
                   "--init", "spread", env_home=cartridge_home)
    assert proc.returncode != 0
    assert "a batch of 2 cannot be split between 4 processes" in proc.stderr
    assert "Traceback" not in proc.stderr


# Run in a process of its own: it joins a process group the way each training process does, then prints
# the addresses of the sockets it listens on (Linux: its socket inodes matched in /proc/net/tcp and tcp6).
LISTENERS = r"""
import os, sys
from pathlib import Path
import torch.distributed as dist
from engine.training.distributed import join_group

join_group(0, 1, Path(sys.argv[1]), "gloo")
inodes = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the descriptor listdir itself used
        continue
    if target.startswith("socket:["):
        inodes.add(target[8:-1])
for table in ("tcp", "tcp6"):
    for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            print(table, fields[1].split(":")[0])
dist.destroy_process_group()
"""


def test_training_processes_listen_on_this_machine_only(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    proc = subprocess.run([sys.executable, "-c", LISTENERS, str(tmp_path / "rendezvous")], capture_output=True,
                          text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    addresses = [line.split() for line in proc.stdout.splitlines()]
    assert addresses, "the process group opened no socket to check"
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them
    assert all(address in loopback for _, address in addresses), addresses
