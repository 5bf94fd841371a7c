"""The training configuration: model, optimizer, data, run length, parallelism, checkpoints.

One typed config (pydantic, unknown keys are errors) built from a preset name or a TOML file, then
changed by ``key=value`` overrides with dotted keys (``steps=200``,
``model.moe.n_routed_experts=16``, ``optim.lr_dense=1e-3``). TOML strings may reference
``${NMOE_*}`` environment variables (``${NMOE_DATA:-/data}`` gives a default); any other
variable, or an unset one without default, is an error naming it.

`TrainConfig.fingerprint` hashes what changes the math of a step (model, optimizer, data order,
batch shape, seed, precision) and leaves out run length, logging, checkpoint cadence and targets,
so a run can be resumed with a larger ``steps``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nmoe_core.config import ModelConfig, apply_overrides
from nmoe_core.optim.config import OptimizerConfig
from nmoe_core.presets import model_preset, optimizer_preset


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSourceConfig(_Config):
    """One dataset of a mixture: a prepared dataset directory or ``builtin:NAME``."""

    path: str
    weight: float = Field(1.0, gt=0)


class DataConfig(_Config):
    """Where tokens come from. ``sources`` is a weighted mixture (one source: weight ignored)."""

    sources: list[DataSourceConfig] = Field(
        default_factory=lambda: [DataSourceConfig(path="builtin:shakespeare")], min_length=1
    )
    val_source: str | None = Field(
        None, description="dataset for validation; default: the first source's val split"
    )
    data_root: str = Field(
        "~/.cache/nmoe/data", description="where builtin datasets are prepared and cached"
    )
    synthetic: bool = Field(
        False, description="random tokens instead of data (throughput runs only; no val)"
    )


class ParallelConfig(_Config):
    """How the run spreads over ranks (under torchrun)."""

    expert_parallel: Literal["none", "all"] = Field(
        "none", description="'all': experts split over every rank; 'none': replicated"
    )
    dispatcher: Literal["auto", "local", "nccl", "ipc", "nvshmem"] = Field(
        "auto",
        description="dispatcher backend for expert parallelism; auto: ipc when every rank drives "
        "a CUDA GPU of one node (torchrun's LOCAL_WORLD_SIZE == WORLD_SIZE), nccl otherwise",
    )
    dedup_rows: bool = Field(
        True, description="ipc / nvshmem inside a node: send each token's row once per owner "
        "rank instead of once per routed slot (bitwise the same results; fewer NVLink bytes: "
        "about 2.2x fewer at top-8 of 256 experts on 4 GPUs); ignored by other dispatchers")
    reduce_on_owner: bool = Field(
        True, description="ipc / nvshmem inside a node, implies dedup_rows: the MoE combine and "
        "the dispatch backward also send one row per token and owner rank; the owner sums the "
        "token's slots first (float32, rounded to the row dtype), so results differ from the "
        "per-slot sum by that rounding (deterministic; see nmoe-comm's README); ignored by "
        "other dispatchers. false (with dedup_rows=false) restores one row per slot both ways")
    pipelined_comm: bool | None = Field(
        None, description="ipc / nvshmem inside a node: true runs each dispatch and combine as "
        "one kernel whose local copies overlap the NVLink transfers (nmoe-comm's pipelined "
        "kernels; bitwise the same rows), false the two-kernel path; null lets the dispatcher "
        "choose (pipelined from 4096 slots per rank and micro-batch, and with dedup_rows only "
        "for rows of 4 KiB and more: `super` at dim 768 stays on the two-kernel path, which ran "
        "its 4-GPU step 5% faster); ignored by other dispatchers")
    zero2_chunk_mb: int = Field(256, ge=1, description="reduce-scatter/all-gather chunk size")


# Fields added to the hashed configs after runs had been checkpointed, with the value that does
# what the code did before they existed: at that value they stay out of the fingerprint.
_FINGERPRINT_NEUTRAL: dict[str, dict[str, Any]] = {
    "optim": {"adamw_state_dtype": "float32"},
}


class TrainConfig(_Config):
    """Everything one training run needs. See the module docstring for overrides."""

    preset: str = "custom"
    model: ModelConfig
    optim: OptimizerConfig
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    # Run length and batch shape
    steps: int = Field(1000, ge=1)
    seq_len: int = Field(1024, ge=2)
    global_batch: int = Field(32, ge=1, description="sequences per optimizer step, all ranks")
    micro_batch: int = Field(0, ge=0, description="sequences per forward per rank (0: all)")
    seed: int = 0
    # Numerics and devices
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on GPU (fp32 master weights), fp32 on CPU"
    )
    activation_checkpointing: bool = False
    cache_expert_weights: bool = Field(
        False, description="fused BF16 recipe: keep the experts' bf16 weight copies from a step's "
        "first forward to its optimizer step instead of casting the fp32 masters in every forward "
        "and backward (+2 bytes per expert parameter while the step runs; same results)")
    optimizer_refreshes_expert_copies: bool = Field(
        True, description="with cache_expert_weights: the AdamW step writes the experts' bf16 "
        "copies as it updates the fp32 masters (2 bytes per expert parameter) instead of the next "
        "forward casting the masters again (6 bytes); the copies then stay allocated across "
        "steps. Same bits either way. Experts under Muon or sharded by data-parallel ZeRO-2 are "
        "cast as before")
    compile: bool = Field(
        False, description="torch.compile each block's attention half, the MLPs and the routers "
        "(Transformer.compile_regions): fuses their casts, norms, rotary and residual passes; "
        "costs about a minute of compilation at start-up")
    cpu_threads: int = Field(0, ge=0, description="torch threads on CPU (0: torch's default)")
    # Validation and stopping
    val_every: int = Field(100, ge=0, description="steps between validations (0: never)")
    val_sequences: int = Field(64, ge=1, description="validation sequences (all ranks)")
    target_loss: float | None = Field(None, description="stop once val loss <= this")
    max_time_s: float | None = Field(None, gt=0, description="stop after this much training time")
    # In-training evaluation (needs nmoe-eval installed; found through the entry point group
    # `nmoe.train_hooks`)
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0: never)")
    eval_tasks: str = Field("core", description="tasks for eval_every, e.g. 'core' or 'core,mmlu'")
    eval_max_examples: int | None = Field(500, ge=1, description="examples per task (None: all)")
    final_eval_tasks: str | None = Field(
        None, description="tasks evaluated once when the run ends (speedruns: 'core')"
    )
    # Bookkeeping
    runs_root: str = "runs"
    run_name: str | None = None
    log_every: int = Field(10, ge=1)
    checkpoints: bool = Field(True, description="write checkpoints at all (false: throughput runs)")
    checkpoint_optimizer: bool = Field(
        True, description="include optimizer state (false: weights only, for evaluation; such a "
        "checkpoint cannot be resumed exactly)"
    )
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only end)")
    keep_checkpoints: int = Field(3, ge=1)
    resume: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        max_pos = self.model.attention.max_position_embeddings
        if self.seq_len > max_pos:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds model.attention.max_position_embeddings={max_pos}"
            )
        return self

    def fingerprint(self) -> str:
        """SHA-256 (16 hex) of the fields that change the math of a step (module docstring).

        A field added after checkpoints existed is left out while it has the value that
        reproduces the old behaviour (`_FINGERPRINT_NEUTRAL`), so upgrading keeps those runs
        resumable; any other value changes the fingerprint."""
        blob = json.dumps(_math_fields(self.model_dump(mode="json")), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def fingerprint_changes(self, old: dict[str, Any]) -> list[str]:
        """What differs in the fingerprinted fields between ``old`` (a config as saved with a
        checkpoint, ``model_dump(mode="json")``) and this config: ``"optim.lr_dense: 0.003 ->
        0.001"`` per changed leaf, dotted as in overrides."""
        before = _flatten(_math_fields(old))
        after = _flatten(_math_fields(self.model_dump(mode="json")))
        return [f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
                for key in sorted(before.keys() | after.keys())
                if before.get(key) != after.get(key)]


def _math_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a dumped config (``TrainConfig.model_dump(mode="json")``) that the
    fingerprint hashes, keyed as the fingerprint has always keyed it."""
    optim = dict(config.get("optim", {}))
    for field, neutral in _FINGERPRINT_NEUTRAL["optim"].items():
        if optim.get(field) == neutral:
            del optim[field]
    data = {k: v for k, v in config.get("data", {}).items() if k != "data_root"}
    return {
        "model": config.get("model"),
        "optim": optim,
        "data": data,
        "seq_len": config.get("seq_len"),
        "global_batch": config.get("global_batch"),
        "seed": config.get("seed"),
        "precision": config.get("precision"),
        "expert_parallel": config.get("parallel", {}).get("expert_parallel"),
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of a nested dict; lists stay whole (``data.sources``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# Training presets (model + optimizer from nmoe_core.presets, plus run shape and targets)


def _train_preset(name: str) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {
        # Shakespeare (gpt2): unigram entropy 6.43 nats/token; 4.9 is perplexity 134 vs 620.
        "tiny": dict(steps=400, seq_len=256, global_batch=16, val_every=25, val_sequences=64,
                     target_loss=4.9, log_every=10, final_eval_tasks="core",
                     eval_max_examples=100),
        # micro_batch 16, compile and the cached expert casts: the fastest measured execution
        # (nmoe-train README); none of them is in the fingerprint.
        "super": dict(steps=12000, seq_len=2048, global_batch=256, micro_batch=16,
                      val_every=128, val_sequences=5120, target_loss=3.28, log_every=10,
                      final_eval_tasks="core", eval_max_examples=1000, compile=True,
                      cache_expert_weights=True),
        "ultra": dict(steps=100000, seq_len=2048, global_batch=256, micro_batch=8, val_every=128,
                      val_sequences=5120, target_loss=3.28),
        "moonlet": dict(steps=10000, seq_len=4096, global_batch=8, micro_batch=1, val_every=500,
                        val_sequences=64),
        "moonlight": dict(steps=10000, seq_len=4096, global_batch=64, micro_batch=1,
                          val_every=500, val_sequences=256,
                          parallel=dict(expert_parallel="all", dispatcher="nccl")),
    }
    if name not in runs:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(runs)}")
    return runs[name]


PRESET_NAMES = ("tiny", "super", "ultra", "moonlet", "moonlight")


def preset_config(name: str) -> TrainConfig:
    """The training config of preset ``name``."""
    fields = _train_preset(name)
    return TrainConfig(
        preset=name, model=model_preset(name), optim=optimizer_preset(name), **fields
    )


# --------------------------------------------------------------------------------------------
# TOML with ${NMOE_*} variables

_VAR = re.compile(r"\$\{([^}:]*)(?::-([^}]*))?\}")


class ConfigFileError(ValueError):
    """The config cannot be used: an unreadable or invalid file, a variable it may not use, a
    malformed override, or settings this machine or world size cannot run; the message names
    the field and the fix."""


def expand_variables(value: Any, where: str = "") -> Any:
    """Expand ``${NMOE_X}`` / ``${NMOE_X:-default}`` in every string of a TOML tree."""
    if isinstance(value, dict):
        return {k: expand_variables(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_variables(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if not re.fullmatch(r"NMOE_[A-Z0-9_]+", name):
            raise ConfigFileError(
                f"{where}: variable ${{{name}}} is not allowed; config files may only use "
                f"${{NMOE_*}} variables (upper case, e.g. ${{NMOE_DATA}})"
            )
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigFileError(
            f"{where}: variable ${{{name}}} is not set; export it or write ${{{name}:-default}}"
        )

    expanded = _VAR.sub(substitute, value)
    if "${" in expanded:
        raise ConfigFileError(f"{where}: malformed variable reference in {value!r}")
    return expanded


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_toml(path: Path) -> TrainConfig:
    """Read a TOML config. A top-level ``preset = "NAME"`` starts from that preset and the rest
    of the file overrides it; otherwise the file must give ``model`` and ``optim`` in full."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"config file {path} cannot be read ({err}); pass a UTF-8 TOML "
                              "file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigFileError(f"{path}: invalid TOML: {err}") from None
    raw = expand_variables(raw)
    preset = raw.get("preset")
    if preset and preset != "custom":
        try:
            raw = _deep_merge(preset_config(preset).model_dump(), raw)
        except ValueError as err:
            raise ConfigFileError(f"{path}: preset: {err}") from None
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe_error(e) for e in err.errors())
        raise ConfigFileError(f"{path}: {problems}") from None


def _describe_error(error: dict[str, Any]) -> str:
    """One pydantic error as ``dotted.key: what is wrong``; an unknown key gets the nearest
    valid keys of its table."""
    loc = error["loc"]
    where = ".".join(str(p) for p in loc) or "(config)"
    if error["type"] != "extra_forbidden":
        given = error.get("input")
        return f"{where}: {error['msg']}" + (
            "" if isinstance(given, dict | list) else f", got {given!r}")
    node: Any = TrainConfig
    try:
        for part in loc[:-1]:
            if isinstance(part, int):
                continue
            node = node.model_fields[part].annotation
            while not (isinstance(node, type) and issubclass(node, BaseModel)):
                node = next(a for a in get_args(node) if a is not type(None))  # list[X], X | None
    except (KeyError, StopIteration):  # a table this walk does not know: no suggestion
        return f"{where}: unknown key"
    valid = list(node.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.5)
    hint = (f"did you mean {', '.join(close)}?" if close else
            f"valid keys here: {', '.join(valid)}")
    return f"{where}: unknown key; {hint}"


def resolve_config(spec: str, overrides: list[str]) -> TrainConfig:
    """``spec`` is a preset name or a TOML path; ``overrides`` are ``key=value`` strings."""
    if spec in PRESET_NAMES:
        cfg = preset_config(spec)
    elif spec.endswith(".toml") or Path(spec).exists():
        cfg = load_toml(Path(spec))
    else:
        raise ConfigFileError(
            f"{spec!r} is neither a preset ({', '.join(PRESET_NAMES)}) nor a TOML file"
        )
    parsed: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigFileError(f"override {item!r} is not key=value (e.g. steps=100)")
        key, value = item.split("=", 1)
        key = key.strip()
        _check_json_syntax(key, value)
        parsed[key] = value
    return apply_overrides(cfg, parsed) if parsed else cfg


_SOURCES_EXAMPLE = ("""data.sources='[{"path": "/data/fineweb", "weight": 3}, """
                    """{"path": "builtin:shakespeare"}]'""")


def _check_json_syntax(key: str, value: str) -> None:
    """A list or table override must be JSON; the shell eating its double quotes is the usual
    cause when it is not, so say how to quote it."""
    text = value.strip()
    if key == "data.sources" and not text.startswith("["):
        raise ConfigFileError(f"data.sources={value!r}: data.sources is a JSON list of "
                              f"{{path, weight}} tables, e.g. {_SOURCES_EXAMPLE}")
    if not text.startswith(("[", "{")):
        return
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        example = f"; e.g. {_SOURCES_EXAMPLE}" if key == "data.sources" else ""
        raise ConfigFileError(
            f"{key}={value!r} is not valid JSON ({err.msg} at character {err.pos + 1}): strings "
            f"need double quotes, so put single quotes around the whole override to keep the "
            f"shell from removing them{example}"
        ) from None
