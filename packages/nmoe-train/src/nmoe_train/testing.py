"""Helpers for nmoe-train's own tests and for users testing configs: run ``n`` in a subprocess
with a model small enough to step in well under a second on a CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig

# A model small enough that a CPU step takes well under a second.
SMALL = [
    "model.dim=64", "model.n_layers=2", "model.inter_dim=128", "model.attention.n_heads=2",
    "model.attention.local_window=16", "model.moe.n_routed_experts=4",
    "model.moe.n_activated_experts=2", "model.moe.moe_inter_dim=32", "model.moe.n_dense_layers=1",
    "seq_len=32", "global_batch=8", "val_sequences=8", "log_every=1", "cpu_threads=1",
    "final_eval_tasks=null",
]


def run_n(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600,
          torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run ``n ARGS`` (or ``torchrun -m nmoe_train ARGS``) in a subprocess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}", "-m", "nmoe_train", *args]
    else:
        cmd = [sys.executable, "-m", "nmoe_train", *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def start_n_until(args: list[str], cwd: Path, marker: Path,
                  timeout: float = 300) -> subprocess.Popen:
    """Start ``n ARGS`` in a subprocess (stderr piped, Ctrl-C restored to its default even when
    the caller runs in the background) and return it, still running, once ``marker`` exists,
    e.g. a checkpoint's manifest; an early exit or ``timeout`` fails the calling test."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nmoe_train", *args], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # A background shell leaves SIGINT ignored, and Python keeps it so: restore Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"{marker} never appeared"
        time.sleep(0.02)
    return proc


def tiny_model_config() -> ModelConfig:
    """A two-layer MoE model (one dense layer, one with 4 experts, top-2) for tests that build
    a `Transformer` directly: vocabulary 128, dim 32, custom tokenizer."""
    return ModelConfig(
        vocab_size=128, dim=32, n_layers=2, inter_dim=64,
        attention=AttentionConfig(n_heads=2, max_position_embeddings=64),
        moe=MoEConfig(n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16,
                      n_dense_layers=1),
        tokenizer="custom", eos_token_id=0,
    )
