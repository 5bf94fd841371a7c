"""The training loop: one process on CPU or one GPU, or torchrun over several GPUs or nodes.

A step: set the learning rates (WSD) -> for each micro-batch, forward (bf16 autocast on GPU) and
backward of the loss normalised by the global target count -> sum gradients over ranks (ZeRO-2
reduce-scatter) -> clip by the global norm -> optimizer step on owned shards -> all-gather ->
router-bias update from the loads summed over ranks -> metrics. Validation every ``val_every``
steps on a held-out split; the run stops at ``steps``, at ``target_loss`` or at ``max_time_s``.
Checkpoints are asynchronous and a run resumes exactly from the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nmoe_core.model import Transformer
from nmoe_core.moe import resolve_backend
from nmoe_core.progress import Progress, format_count, format_duration
from nmoe_core.weights import flatten_optimizer_state, unflatten_optimizer_state
from nmoe_train.checkpoint import Checkpointer, CheckpointError, list_checkpoints
from nmoe_train.config import ConfigFileError, TrainConfig
from nmoe_train.distributed import (
    DistInfo,
    SingleProcessOptimizer,
    Zero2Optimizer,
    all_reduce_sum,
    clip_coefficient,
    init_distributed,
)
from nmoe_train.metrics import MetricsDB

# Dense bf16 tensor-core peaks (TFLOP/s) used for MFU; matched on torch.cuda.get_device_name().
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "GB200": 2500.0, "A100": 312.0}


class Terminated(KeyboardInterrupt):
    """SIGTERM (what job schedulers send to stop or preempt a job) received while `Trainer.run`
    was training: raised in the main thread so the run unwinds as it does on Ctrl-C (the pending
    checkpoint finalised, the run marked ``interrupted``)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_id: str
    run_dir: Path
    status: str  # completed | target_reached | time_limit | failed_nan
    steps: int
    tokens: int
    train_time_s: float
    final_val_loss: float | None
    target_reached: bool
    step_to_target: int | None = None
    tokens_to_target: int | None = None
    time_to_target_s: float | None = None
    tokens_per_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)


def _hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU by name, None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in sorted(_PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N_active`` (non-embedding active parameters: every matmul
    weight a token passes through, the lm head included, routed experts counted top-k of E)
    plus causal attention ``6 * L * H * d_qk * S`` (half of the PaLM ``12 L H Q T`` term)."""
    cfg = model.cfg
    counts = model.num_params()
    n_active = counts["active"] - counts["embedding"]
    att = cfg.attention
    if att.kind == "mla":
        qk_dim = att.qk_nope_head_dim + att.qk_rope_head_dim
        v_dim = att.v_head_dim
    else:
        qk_dim = v_dim = cfg.head_dim
    attn = 3 * cfg.n_layers * att.n_heads * (qk_dim + v_dim) * seq_len
    return 6.0 * n_active + attn


def resolve_dispatcher(name: str, device: torch.device, world_size: int,
                       local_world_size: int) -> str:
    """The dispatcher backend ``parallel.dispatcher`` names; ``auto`` is ``ipc`` (CUDA IPC, the
    fastest inside a node) when every rank drives a CUDA GPU of one node, else ``nccl`` (any
    device, any number of nodes; over gloo on CPU)."""
    if name != "auto":
        return name
    return "ipc" if device.type == "cuda" and local_world_size == world_size else "nccl"


class Trainer:
    """Builds everything a run needs from a `TrainConfig` and runs it (`run`)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, quiet: bool = False):
        self.cfg = cfg
        self.quiet = quiet
        device_kind = self._device_kind()
        self.dist: DistInfo = init_distributed(device_kind)
        self.device = self.dist.device
        self.precision = cfg.precision if cfg.precision != "auto" else (
            "bf16-mixed" if device_kind == "cuda" else "fp32"
        )
        if device_kind == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self.fingerprint = cfg.fingerprint()
        self.run_id, self.run_dir = self._run_identity(run_dir)
        # The seeded initialisation draws every weight on the CPU (tens of seconds for billions
        # of expert weights): say what is happening before the startup report.
        self._print(f"run {self.run_id}: building the model, optimizer and data on {self.device}")
        try:
            self._build_model()
            self._build_optimizer()
            self._build_data()
        except BaseException:
            # A setup mistake should not leave an empty run directory behind (rmdir removes
            # nothing else: a directory with anything in it stays).
            if self._created_run_dir:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", keep_last=cfg.keep_checkpoints, rank=self.dist.rank,
            world_size=self.dist.world_size,
            barrier=dist.barrier if self.dist.is_distributed else None,
        )
        self.metrics = MetricsDB(self.run_dir / "metrics.db") if self.dist.is_main else None
        self.step = 0
        self.tokens_seen = 0
        self.train_time_s = 0.0
        self.val_history: list[tuple[int, float]] = []
        self.target: dict[str, Any] | None = None
        self.resumed_from: Path | None = None
        self._saved_step: int | None = None
        self.eval_hook = None
        if cfg.eval_every or cfg.final_eval_tasks:
            from nmoe_train.hooks import require_eval_hook

            self.eval_hook = require_eval_hook()
        if cfg.resume:
            self._maybe_resume()
        else:
            self._refuse_overwrite()

    # ----------------------------------------------------------------------------------------
    # Setup

    def _device_kind(self) -> str:
        want = self.cfg.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigFileError("device=cuda was asked for but torch sees no CUDA GPU; use "
                                  "device=auto or device=cpu")
        if want == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return want

    def _run_identity(self, run_dir: Path | None) -> tuple[str, Path]:
        cfg = self.cfg
        name = cfg.run_name or f"{cfg.preset}-{self.fingerprint[:8]}"
        run_dir_given = run_dir is not None
        run_dir = Path(run_dir) if run_dir else Path(cfg.runs_root).expanduser() / name
        self._created_run_dir = self.dist.is_main and not run_dir.exists()
        if self.dist.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                where = "--run-dir" if run_dir_given else "runs_root"
                raise ConfigFileError(
                    f"cannot create the run directory {run_dir} ({err.strerror}): set {where} "
                    f"to a writable directory") from err
        if self.dist.is_distributed:
            dist.barrier()
        return name, run_dir

    def _build_model(self) -> None:
        cfg, info = self.cfg, self.dist
        expert_parallel = cfg.parallel.expert_parallel == "all" and info.world_size > 1
        ep_rank, ep_world = (info.rank, info.world_size) if expert_parallel else (0, 1)
        model = Transformer(cfg.model, ep_rank=ep_rank, ep_world_size=ep_world, seed=cfg.seed)
        self.model = model.to(self.device)
        if self.device.type == "cpu":
            # Plenty of host memory, little compute: keep the loss's softmax for the backward.
            self.model.loss_keep_bytes = 2 << 30
        self.expert_parallel = expert_parallel
        # The MoE layers' dispatcher has the capacity of the worst case of one micro-batch (all
        # of its rows, from every expert-parallel rank, on one rank): buffers and scratch are
        # sized from it, never from the routing of the moment.
        micro = cfg.micro_batch or cfg.global_batch // info.world_size
        self.capacity = micro * cfg.seq_len * cfg.model.moe.n_activated_experts * ep_world
        backend = resolve_dispatcher(cfg.parallel.dispatcher, self.device, info.world_size,
                                     int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
        backend = backend if expert_parallel else "local"
        options: dict = {}
        if backend == "local":
            # The ids come from the router's top-k over E columns, so they are in range by
            # construction; the local dispatcher's id range check would read them back to the
            # host on every dispatch (forward and backward, every layer and micro-batch).
            options = dict(validate=False)
        if backend in ("ipc", "nvshmem"):
            # Buffers sized once: the widest row and its dtype, `capacity` landing rows, and a
            # return buffer for the slots this rank sends per call, T x K of one micro-batch
            # (training, validation and evaluation all run micro-batches). Left at its default
            # (capacity, ep_world times larger) it cost 1 GiB per layer at `super` EP4 mb16.
            options = dict(hidden=cfg.model.dim, device=self.device, dtype=(
                torch.bfloat16 if self.precision == "bf16-mixed" else torch.float32),
                dedup_rows=cfg.parallel.dedup_rows or cfg.parallel.reduce_on_owner,
                reduce_on_owner=cfg.parallel.reduce_on_owner,
                pipelined=cfg.parallel.pipelined_comm,
                max_send_rows=micro * cfg.seq_len * cfg.model.moe.n_activated_experts)
        from nmoe_comm import create_dispatcher

        # One dispatcher serves every MoE layer. The per-call routing state lives in the handles,
        # several of which may be alive at once (nmoe_comm.rdep), and the calls of a step are
        # issued one after another on one stream, so the layers need not each hold their own
        # capacity-sized peer buffers: for ipc / nvshmem that is capacity x row bytes, about
        # 1.5 GB per layer for `super` at micro-batch 16 on 4 GPUs, 12 layers of it before.
        layers = self.model.moe_layers()
        if layers:
            shared = create_dispatcher(backend, num_experts=layers[0].num_experts,
                                       capacity=self.capacity, world_size=ep_world, rank=ep_rank,
                                       **options)
            self.model.set_dispatchers(lambda layer: shared)
        for layer in layers:
            layer.cache_expert_weights = cfg.cache_expert_weights
        self.compiled_regions = self.model.compile_regions() if cfg.compile else []
        if cfg.activation_checkpointing:
            self._enable_checkpointing()

    def _enable_checkpointing(self) -> None:
        from torch.utils.checkpoint import checkpoint

        for block in self.model.layers:
            forward = block.forward

            def wrapped(x, start_pos=0, cache=None, _forward=forward):
                if cache is not None or not torch.is_grad_enabled():
                    return _forward(x, start_pos, cache)
                return checkpoint(_forward, x, start_pos, None, use_reentrant=False)

            block.forward = wrapped

    def _local_param_ids(self) -> set[int]:
        if not self.expert_parallel:
            return set()
        return {id(p) for _, p in self.model.param_kinds()["expert"]}

    def _build_optimizer(self) -> None:
        cfg, info = self.cfg, self.dist
        if info.is_distributed:
            self.optimizer: Any = Zero2Optimizer(
                self.model, cfg.optim, self._local_param_ids(), info.rank, info.world_size,
                chunk_bytes=cfg.parallel.zero2_chunk_mb << 20,
            )
        else:
            self.optimizer = SingleProcessOptimizer(self.model, cfg.optim)

    def _dataset_dirs(self) -> list[tuple[Path, float]]:
        from nmoe_train.data import DataError, ensure_builtin_dataset

        root = Path(self.cfg.data.data_root).expanduser()
        out = []
        for source in self.cfg.data.sources:
            if source.path.startswith("builtin:"):
                name = source.path.split(":", 1)[1]
                if self.dist.is_main:
                    try:
                        path = ensure_builtin_dataset(name, root, self.cfg.model.tokenizer,
                                                      progress=not self.quiet)
                    except OSError as err:
                        raise DataError(
                            f"cannot build the builtin dataset {name!r} under data.data_root="
                            f"{root} ({err.strerror}: {err.filename}): set data.data_root to a "
                            f"writable directory") from err
                if self.dist.is_distributed:
                    dist.barrier()
                path = ensure_builtin_dataset(name, root, self.cfg.model.tokenizer, progress=False)
            else:
                path = Path(source.path).expanduser()
            out.append((path, source.weight))
        return out

    def _build_data(self) -> None:
        from nmoe_train.data import TokenLoader

        cfg, info = self.cfg, self.dist
        if cfg.global_batch % info.world_size:
            raise ConfigFileError(
                f"global_batch={cfg.global_batch} must be divisible by the world size "
                f"{info.world_size}"
            )
        self.local_batch = cfg.global_batch // info.world_size
        self.micro_batch = cfg.micro_batch or self.local_batch
        if self.local_batch % self.micro_batch:
            raise ConfigFileError(
                f"micro_batch={self.micro_batch} must divide the per-rank batch "
                f"{self.local_batch} (global_batch / world_size)"
            )
        if cfg.data.synthetic:
            self.train_loader = None
            self.val_dataset = None
            self._synthetic_gen = torch.Generator().manual_seed(cfg.seed * 7919 + info.rank)
            return
        datasets = self._dataset_dirs()
        self.train_loader = TokenLoader(
            datasets, "train", cfg.seq_len, cfg.global_batch, info.rank, info.world_size,
            seed=cfg.seed,
        )
        self.val_dataset = Path(cfg.data.val_source).expanduser() if cfg.data.val_source else (
            datasets[0][0]
        )
        self._check_tokenizer(self.train_loader, datasets[0][0])
        if cfg.val_every:  # a missing or too small val split fails now, not at the first val
            self._check_tokenizer(self._val_loader(), self.val_dataset)

    def _check_tokenizer(self, loader, path: Path) -> None:
        """The data's token ids must be the model's: same tokenizer, ids below vocab_size."""
        from nmoe_core.tokenizer import TOKENIZER_NAMES
        from nmoe_train.data import DataError

        model = self.cfg.model
        named = model.tokenizer in TOKENIZER_NAMES
        if loader.n_vocab > model.vocab_size or (named and loader.tokenizer != model.tokenizer):
            raise DataError(
                f"{path} was prepared with tokenizer {loader.tokenizer} ({loader.n_vocab} ids) "
                f"but the model has model.tokenizer={model.tokenizer}, model.vocab_size="
                f"{model.vocab_size}: prepare the data with `n data prep ... --tokenizer "
                f"{model.tokenizer}`, or train a model for {loader.tokenizer} "
                f"(model.tokenizer={loader.tokenizer} and a vocab_size >= {loader.n_vocab})"
            )

    def _val_loader(self):
        """A fresh loader over the first ``val_sequences`` windows of the val split."""
        from nmoe_train.data import TokenLoader

        cfg, info = self.cfg, self.dist
        val_global = max(info.world_size, cfg.val_sequences // info.world_size * info.world_size)
        return TokenLoader(self.val_dataset, "val", cfg.seq_len, val_global, info.rank,
                           info.world_size, seed=0, shuffle=False)

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def _shared_and_local_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        local_ids = self._local_param_ids()
        shared, local = {}, {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            (local if id(tensor) in local_ids else shared)[name] = tensor.detach()
        opt_meta = None
        if self.cfg.checkpoint_optimizer:
            opt_tensors, opt_meta = flatten_optimizer_state(self.optimizer.state_dict())
            for key, tensor in opt_tensors.items():
                local[f"optimizer/{key}"] = tensor
        local["rng/cpu"] = torch.get_rng_state()
        self._opt_meta = opt_meta
        return shared, local

    def save_checkpoint(self) -> None:
        """Checkpoint this step (asynchronous); metrics up to it are flushed to disk first, so a
        run killed later resumes with a database that matches the checkpoint's timeline."""
        if self._saved_step == self.step or not self.cfg.checkpoints:
            return
        self._saved_step = self.step
        if self.metrics is not None:
            self.metrics.flush()
        shared, local = self._shared_and_local_state()
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_time_s": self.train_time_s,
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "config": self.cfg.model_dump(mode="json"),
            "val_history": self.val_history,
            "target": self.target,
        }
        rank_meta = {
            "optimizer": self._opt_meta,
            "loader": self.train_loader.state_dict() if self.train_loader else None,
        }
        self.checkpointer.save(self.step, shared, local, meta, rank_meta)

    def _finalised_checkpoints(self) -> list[Path]:
        return [path for _, path in list_checkpoints(self.checkpointer.root)
                if not path.name.endswith(".tmp")]

    def _refuse_overwrite(self) -> None:
        """resume=false starts at step 0, and its saves would replace this run directory's
        checkpoints of the same steps and prune the rest: refuse while there are any."""
        found = self._finalised_checkpoints()
        if found:
            raise CheckpointError(
                f"{self.checkpointer.root} holds checkpoints ({', '.join(p.name for p in found)})"
                f" and resume=false would overwrite them: use another run_name (or --run-dir) "
                f"for a new run, resume=true to continue this one, or move {self.run_dir} away"
            )

    def _maybe_resume(self) -> None:
        latest = self.checkpointer.latest()
        for problem in self.checkpointer.problems:
            self._print(f"checkpoint skipped: {problem}")
        if latest is None:
            if self._finalised_checkpoints():  # starting over would overwrite them
                raise CheckpointError(
                    f"no usable checkpoint in {self.checkpointer.root}: "
                    f"{'; '.join(self.checkpointer.problems)}. Starting at step 0 would overwrite"
                    f" them: move them out of {self.checkpointer.root} to start this run over, "
                    f"or use another run_name (or --run-dir) for a new run"
                )
            return
        shared, local, meta, rank_meta = self.checkpointer.load(latest, device=self.device)
        if meta["fingerprint"] != self.fingerprint:
            changes = self.cfg.fingerprint_changes(meta.get("config") or {})
            raise CheckpointError(
                f"{latest} was written by a run with config fingerprint {meta['fingerprint']}, "
                f"this config has {self.fingerprint}: "
                + ("; ".join(changes) if changes else "model, optimizer or data order changed")
                + ". Undo the change to resume this run, or use another run_name (or --run-dir)"
                " to start a new one"
            )
        state = {**shared, **{k: v for k, v in local.items() if "/" not in k}}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{latest}: model state mismatch (missing {missing}, "
                                  f"unexpected {unexpected})")
        if rank_meta.get("optimizer") is None:
            raise CheckpointError(
                f"{latest} holds weights only (written with checkpoint_optimizer=false) and cannot"
                f" be resumed exactly; use another run_name (or --run-dir) to start a new run"
            )
        opt_tensors = {k[len("optimizer/"):]: v for k, v in local.items()
                       if k.startswith("optimizer/")}
        self.optimizer.load_state_dict(
            unflatten_optimizer_state(opt_tensors, rank_meta["optimizer"])
        )
        torch.set_rng_state(local["rng/cpu"].cpu())
        if self.train_loader is not None and rank_meta.get("loader"):
            self.train_loader.load_state_dict(rank_meta["loader"])
        self.step = int(meta["step"])
        self.tokens_seen = int(meta["tokens_seen"])
        self.train_time_s = float(meta["train_time_s"])
        self.val_history = [tuple(x) for x in meta.get("val_history", [])]
        self.target = meta.get("target")
        self.resumed_from = latest
        self._saved_step = self.step

    # ----------------------------------------------------------------------------------------
    # One step

    def _autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_loader is None:
            vocab = self.cfg.model.vocab_size
            tokens = torch.randint(0, vocab, (self.local_batch, self.cfg.seq_len + 1),
                                   generator=self._synthetic_gen)
            return tokens[:, :-1], tokens[:, 1:]
        return self.train_loader.next_batch()

    def _count_targets(self, targets: torch.Tensor) -> torch.Tensor:
        ignore = self.model.ignore_index
        count = (targets != ignore).sum().to(torch.float64).reshape(1)
        return all_reduce_sum(count.to(self.device)).clamp_min(1.0)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lrs = self.optimizer.set_lr(self.step, self.tokens_seen)
        inputs, targets = self._next_batch()
        global_targets = self._count_targets(targets)
        n_micro = self.local_batch // self.micro_batch
        n_total_micro = n_micro * self.dist.world_size
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # lm sum, mtp, aux, n
        mtp_weight = cfg.model.mtp_weight(self.tokens_seen)
        self.model.train()
        for micro in range(n_micro):
            rows = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            x = inputs[rows].to(self.device, non_blocking=True)
            y = targets[rows].to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(x, y, mtp_weight=mtp_weight)
            loss = out.lm_loss_sum / global_targets.to(out.lm_loss_sum.dtype)
            if out.mtp_loss is not None:
                loss = loss + mtp_weight * out.mtp_loss / n_total_micro
                totals[1] += out.mtp_loss.detach().double()
            if out.aux_loss is not None:
                loss = loss + cfg.model.moe.aux_loss_alpha * out.aux_loss / n_total_micro
                totals[2] += out.aux_loss.detach().double()
            loss.backward()
            totals[0] += out.lm_loss_sum.detach().double()
            totals[3] += 1
        self.optimizer.reduce_gradients()
        grad_norm = all_reduce_sum(self.optimizer.grad_norm_sq_local().double().reshape(1)).sqrt()
        # Clipping stays on the device: the factor is a device scalar the optimizers multiply in
        # where they read the gradients; the norm reaches the host with the step's statistics.
        clip_coef = None
        if cfg.optim.grad_clip is not None:
            clip_coef = clip_coefficient(grad_norm, cfg.optim.grad_clip).reshape(())
        # Weight copies (FP8, bf16) are made once per step, not per micro-batch; the bf16 ones
        # come out of the AdamW update itself where it can write them.
        copies = self._expert_copy_targets()
        refreshed = self.optimizer.step(grad_coef=clip_coef, param_copies=copies or None)
        for layer in self.model.moe_layers():
            layer.after_optimizer_step(refreshed)
        self.optimizer.zero_grad()
        loads = all_reduce_sum(self.model.router_loads().to(self.device))
        self.model.update_router_biases(
            loads, cfg.model.moe.router_bias_update_rate * lrs["router_lr_scale"]
        )
        all_reduce_sum(totals)
        self.step += 1
        self.tokens_seen += cfg.global_batch * cfg.seq_len
        # Everything the step reports crosses to the host in ONE read (float64 throughout).
        host = torch.cat([
            (totals[0] / global_targets).reshape(1), grad_norm.reshape(1).to(totals.device),
            totals[1:3], totals[1:3] / totals[3], loads.double().flatten().to(totals.device),
        ]).cpu()
        loss, norm, mtp_sum, aux_sum, mtp_mean, aux_mean = host[:6].tolist()
        stats = {"train/loss": loss, "train/grad_norm": norm,
                 "tokens_seen": float(self.tokens_seen)}
        if mtp_sum:
            stats["train/mtp_loss"] = mtp_mean
        if aux_sum:
            stats["train/aux_loss"] = aux_mean
        for name, value in lrs.items():
            if name != "router_lr_scale":
                stats[f"lr/{name}"] = value
        stats.update(self._router_stats(host[6:].reshape(loads.shape)))
        return stats

    @staticmethod
    def _router_stats(loads: torch.Tensor) -> dict[str, float]:
        stats = {}
        for i, load in enumerate(loads.double().cpu()):
            mean = load.mean().clamp_min(1e-9)
            stats[f"router/layer_{i:02d}/cv"] = (load.std(unbiased=False) / mean).item()
            stats[f"router/layer_{i:02d}/max_load"] = (load.max() / mean).item()
            stats[f"router/layer_{i:02d}/dead"] = float((load == 0).sum())
        return stats

    # ----------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean next-token loss over the first ``val_sequences`` windows of the val split."""
        if self.val_dataset is None:
            return None
        inputs, targets = self._val_loader().next_batch()
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for start in range(0, inputs.shape[0], self.micro_batch):
            x = inputs[start : start + self.micro_batch].to(self.device)
            y = targets[start : start + self.micro_batch].to(self.device)
            with self._autocast():
                out = self.model(x, y)
            totals[0] += out.lm_loss_sum.double()
            totals[1] += out.num_targets.double()
        self.model.train()
        all_reduce_sum(totals)
        return (totals[0] / totals[1].clamp_min(1)).item()

    def evaluate(self, tasks: str) -> dict[str, float]:
        """Run nmoe-eval's tasks in-process on every rank in lockstep (outside the train clock)."""
        cfg, info = self.cfg, self.dist
        t0 = time.perf_counter()
        results = self.eval_hook(
            self.model, cfg.model.tokenizer, tasks, cfg.eval_max_examples, info.rank,
            info.world_size, all_reduce_sum if info.is_distributed else None, self.device,
            max_len=cfg.seq_len, max_batch_tokens=self.micro_batch * cfg.seq_len,
        )
        core = results.get("eval/core")
        self._print(f"step {self.step}: eval {tasks} in {time.perf_counter() - t0:.1f} s"
                    + (f", CORE {core:.4f}" if core is not None else ""))
        return results

    # ----------------------------------------------------------------------------------------
    # The loop

    def _print(self, message: str) -> None:
        if self.dist.is_main and not self.quiet:
            progress = getattr(self, "_progress", None)
            if progress is not None:
                progress.write(message)
            else:
                print(message, file=sys.stderr, flush=True)

    def memory_line(self) -> str:
        """This rank's static memory (weights, gradients, optimizer state once every parameter
        has stepped: what stays allocated besides activations and weight caches) and, on a GPU,
        the device's total and free memory."""
        gib = 2**30
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        grads = self.optimizer.grad_bytes()
        state = sum(self.optimizer.state_bytes().values())
        line = (f"memory per rank before activations: weights {weights / gib:.2f} GiB + grads "
                f"{grads / gib:.2f} + optimizer state {state / gib:.2f} (AdamW moments "
                f"{self.cfg.optim.adamw_state_dtype}) = {(weights + grads + state) / gib:.2f} GiB")
        if self._caches_expert_weights():
            experts = sum(p.numel() for _, p in self.model.param_kinds()["expert"])
            held = ("kept across steps, refreshed by the optimizer"
                    if self.cfg.optimizer_refreshes_expert_copies else "while a step runs")
            line += f", + bf16 expert weight copies {2 * experts / gib:.2f} GiB {held}"
        comm = sum(d.persistent_bytes for d in self.dispatchers())
        if comm:
            line += f", + dispatcher buffers {comm / gib:.2f} GiB (outside torch's allocator)"
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            line += f"; gpu {total / gib:.1f} GiB total, {free / gib:.1f} free"
        return line

    def _moe_backend(self) -> tuple[str, str]:
        """The MoE backend this run's rows get and why (`nmoe_core.moe.resolve_backend`)."""
        moe = self.cfg.model.moe
        rows = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float32
        return resolve_backend(moe.backend, self.device, rows, self.cfg.model.dim,
                               moe.moe_inter_dim)

    def _expert_copy_targets(self) -> dict[torch.Tensor, torch.Tensor]:
        """The cached bf16 expert copies for the optimizer step to write
        (``optimizer_refreshes_expert_copies``), keyed by their master weights; ``{}`` when the
        option or the cache is off, and before the first forward (nothing cached yet)."""
        if not (self.cfg.optimizer_refreshes_expert_copies and self._caches_expert_weights()):
            return {}
        targets: dict[torch.Tensor, torch.Tensor] = {}
        for layer in self.model.moe_layers():
            targets.update(layer.weight_copy_targets())
        return targets

    def _caches_expert_weights(self) -> bool:
        """Whether ``cache_expert_weights`` takes effect: the fused path's BF16 recipe under
        bf16 autocast (elsewhere there is no cast to keep)."""
        return (self.cfg.cache_expert_weights and self.cfg.model.moe.recipe == "bf16"
                and self.precision == "bf16-mixed" and self._moe_backend()[0] == "fused")

    def dispatchers(self) -> list:
        """The distinct dispatchers of the MoE layers (one, shared, as the trainer builds them)."""
        seen: dict[int, object] = {}
        for layer in self.model.moe_layers():
            if layer.dispatcher is not None:
                seen.setdefault(id(layer.dispatcher), layer.dispatcher)
        return list(seen.values())

    def startup_report(self) -> list[str]:
        cfg, info = self.cfg, self.dist
        counts = self.model.num_params()
        moe = cfg.model.moe
        dispatcher = self.model.moe_layers()[0].dispatcher if self.model.moe_layers() else None
        dispatcher_name = dispatcher.name if dispatcher is not None else "none"
        backend, why = self._moe_backend()
        recipe = moe.recipe if backend == "fused" else self.precision
        arch = "cpu"
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            arch = f"sm_{major}{minor}"
        lines = [
            f"run {self.run_id}  ->  {self.run_dir}",
            f"device {_hardware_name(self.device)} x{info.world_size}, precision {self.precision}"
            f", fingerprint {self.fingerprint}",
            f"model {cfg.preset}: {format_count(counts['total'])} params, "
            f"{format_count(counts['active'])} active/token, {cfg.model.n_layers} layers, "
            f"dim {cfg.model.dim}, experts {moe.n_routed_experts} top-{moe.n_activated_experts} "
            f"+{moe.n_shared_experts} shared",
            f"moe backend: {backend} ({why}; {arch}, {recipe}), "
            f"dispatcher {dispatcher_name}"
            + (f", capacity {dispatcher.capacity} rows" if dispatcher is not None else "")
            + (", dedup rows" if getattr(dispatcher, "dedup_rows", False) else "")
            + (" (sums on owners)" if getattr(dispatcher, "reduce_on_owner", False) else "")
            + (", pipelined" if getattr(dispatcher, "pipelined_active", False) else ""),
            f"batch {cfg.global_batch} x {cfg.seq_len} tokens/step (micro {self.micro_batch}/rank)"
            f", steps {cfg.steps}, target {cfg.target_loss}",
            (f"compile: {len(self.compiled_regions)} regions (attention halves, MLPs, routers)"
             if self.compiled_regions else "compile: off (eager)")
            + (", bf16 expert weights cached per step" if self._caches_expert_weights() else "")
            + (" (refreshed by nmoe's AdamW step)" if self._caches_expert_weights()
               and cfg.optimizer_refreshes_expert_copies else ""),
            f"data: {self.train_loader.describe() if self.train_loader else 'synthetic tokens'}",
        ]
        lines.append(self.memory_line())
        lines += ["optimizer: " + line for line in self.optimizer.param_groups_summary()]
        if self.resumed_from:
            lines.append(f"resumed from {self.resumed_from} at step {self.step}")
        return lines

    def run(self) -> TrainResult:
        cfg = self.cfg
        for line in self.startup_report():
            self._print(line)
        if self.metrics is not None:
            self.metrics.start_run(self.run_id, cfg.preset, cfg.model_dump(mode="json"),
                                   self.fingerprint, self.dist.world_size,
                                   resume_step=self.step if self.resumed_from else None)
        flops_tok = flops_per_token(self.model, cfg.seq_len)
        peak = peak_tflops(self.device)
        status, losses = "completed", []
        self._progress = None
        if self.dist.is_main and not self.quiet and sys.stderr.isatty():
            self._progress = Progress(cfg.steps, "train", unit="step", initial=self.step)
        progress = self._progress
        # SIGTERM unwinds like Ctrl-C while training (handlers can only be set from the main
        # thread; elsewhere the default, an immediate exit, stays).
        previous_term = (signal.signal(signal.SIGTERM, _raise_terminated)
                         if threading.current_thread() is threading.main_thread() else None)
        try:
            while self.step < cfg.steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                stats = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.train_time_s += dt
                losses.append(stats["train/loss"])
                tokens_per_s = cfg.global_batch * cfg.seq_len / dt
                stats["throughput/tokens_per_s"] = tokens_per_s
                stats["throughput/tokens_per_s_per_gpu"] = tokens_per_s / self.dist.world_size
                stats["throughput/ms_per_step"] = dt * 1000
                if peak:
                    stats["efficiency/mfu"] = (
                        flops_tok * tokens_per_s / self.dist.world_size / (peak * 1e12)
                    )
                if self.device.type == "cuda":
                    stats["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if not math.isfinite(stats["train/loss"]):
                    status = "failed_nan"
                    self._print(f"step {self.step}: non-finite loss, stopping")
                    break
                status = self._after_step(stats, progress)
                if status != "running":
                    break
                status = "completed"
        except BaseException as err:
            self._abort(err)
            raise
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            if progress is not None:
                progress.close()
        return self._finish(status, losses)

    def _after_step(self, stats: dict[str, float], progress) -> str:
        cfg = self.cfg
        result = "running"
        if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
            val = self.validate()
            if val is not None:
                stats["val/loss"] = val
                self.val_history.append((self.step, val))
                self._print(f"step {self.step}: val loss {val:.4f} "
                            f"({format_duration(self.train_time_s)} of training)")
                if cfg.target_loss is not None and val <= cfg.target_loss and not self.target:
                    self.target = {"step": self.step, "tokens": self.tokens_seen,
                                   "train_time_s": self.train_time_s, "val_loss": val}
                    result = "target_reached"
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            stats.update(self.evaluate(cfg.eval_tasks))
        if self.metrics is not None:
            self.metrics.log(self.step, stats)
        if progress is not None:
            progress.update(1, loss=f"{stats['train/loss']:.3f}",
                            tok_s=format_count(stats["throughput/tokens_per_s"]))
        if progress is None and (self.step % cfg.log_every == 0 or self.step == 1):
            lr = stats.get("lr/dense", stats.get("lr/matrix", 0.0))
            self._print(
                f"step {self.step}/{cfg.steps} | loss {stats['train/loss']:.4f} | lr {lr:.2e} | "
                f"grad {stats['train/grad_norm']:.2f} | "
                f"{format_count(stats['throughput/tokens_per_s'])} tok/s | "
                f"{stats['throughput/ms_per_step']:.0f} ms/step"
            )
        if cfg.max_time_s and self.train_time_s >= cfg.max_time_s and result == "running":
            result = "time_limit"
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        return result

    def _abort(self, err: BaseException) -> None:
        """The loop is unwinding ``err`` (Ctrl-C and SIGTERM included): finalise the checkpoint
        being written (an earlier, complete step; only where no other rank must join its
        barriers) and mark the run ``interrupted`` or ``failed`` in the metrics, so the run
        directory resumes from its newest checkpoint and says how it ended."""
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        try:
            self.checkpointer.__exit__(type(err), err, err.__traceback__)
        except CheckpointError as ckpt_err:
            self._print(f"{ckpt_err}")
        if status == "interrupted":
            saved = self._finalised_checkpoints()
            how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
            self._print(f"{how} at step {self.step}; " + (
                f"to resume from {saved[-1]}, rerun with the same config and run_name="
                f"{self.run_id}" + ("" if self.cfg.resume else " resume=true") if saved else
                "no checkpoint was written, so a rerun starts at step 0"))
        if self.metrics is not None:
            results: dict[str, Any] = {"steps": self.step, "tokens": self.tokens_seen}
            if status == "failed":
                results["error"] = f"{type(err).__name__}: {err}"
            self.metrics.finish(status, results)
            self.metrics.close()

    def _finish(self, status: str, losses: list[float]) -> TrainResult:
        self.save_checkpoint()
        self.checkpointer.close()
        final_eval: dict[str, float] = {}
        if self.cfg.final_eval_tasks and status != "failed_nan":
            final_eval = self.evaluate(self.cfg.final_eval_tasks)
            if self.metrics is not None:
                self.metrics.log(self.step, final_eval)
        final_val = self.val_history[-1][1] if self.val_history else None
        tokens_per_s = self.tokens_seen / self.train_time_s if self.train_time_s else 0.0
        target = self.target or {}
        result = TrainResult(
            run_id=self.run_id, run_dir=self.run_dir, status=status, steps=self.step,
            tokens=self.tokens_seen, train_time_s=self.train_time_s, final_val_loss=final_val,
            target_reached=bool(self.target), step_to_target=target.get("step"),
            tokens_to_target=target.get("tokens"), time_to_target_s=target.get("train_time_s"),
            tokens_per_s=tokens_per_s, losses=losses, eval=final_eval,
        )
        if self.metrics is not None:
            results = {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in result.__dict__.items() if k != "losses"}
            self.metrics.finish(status, results)
            self.metrics.close()
            (self.run_dir / "result.json").write_text(json.dumps(results, indent=2))
        self._print(
            f"{status}: {self.step} steps, {format_count(self.tokens_seen)} tokens in "
            f"{format_duration(self.train_time_s)} ({format_count(tokens_per_s)} tokens/s)"
            + (f", val loss {final_val:.4f}" if final_val is not None else "")
        )
        return result

