"""Every example a user copies from the READMEs works, checked from the READMEs themselves.

The fenced blocks of ``README.md`` and ``packages/*/README.md`` are extracted at test time (never
copied here) and each one has an explicit entry in `EXAMPLES`, keyed by (README, block index) and
pinned by its language and first line, so a new or moved block fails
`test_every_block_is_classified` until someone decides how it is checked:

- ``run``: a CPU-runnable ```python block, executed in a subprocess (fresh random inputs: the
  seed is printed on failure, ``NMOE_TEST_SEED=<seed>`` replays it), with the inputs a fragment
  leaves to the reader given by ``setup`` and its result compared with an independent computation
  by ``check`` (run after the block, in its namespace).
- ``static``: a ```python block that needs a CUDA GPU or a multi-rank job. Every ``nmoe_*`` name it
  imports, calls or reads must exist, and every call of an nmoe callable must bind to that
  callable's signature (positional count and keyword names), also for methods of the values the
  block builds (through return annotations), so a renamed function, method, field or argument
  fails on CPU. (``run`` blocks get the same check.)
- ``shell``: ```bash blocks. ``n ...`` and ``torchrun ... -m nmoe_train ...`` run in-process with
  the expensive step replaced by a stub (the trainer, data prep, checkpoint loading, ...): the verb
  must exist, the arguments parse, ``key=value`` overrides validate and land in the config, and a
  ``# error: MSG`` comment must be the command's actual error. ``python -c`` runs; script paths,
  their ``--flags``, pytest markers, ``ci/gpu.sh`` stages and pip extras must exist.
- ``toml``: loaded with nmoe-train's config loader; ``core_table``: an ``n eval`` output whose
  centered accuracies and CORE mean are recomputed; ``sqlite``: the queries run on a metrics
  database written by ``MetricsDB``; ``synopsis``: the verb exists and knows every ``--flag``;
  ``text``: layouts, not executable (the reason is stated).

The prose is checked too: inline commands (`` `n speedrun --leaderboard` ``) get the shell checks,
every dotted ``nmoe_*`` name must resolve, documented calls and signatures
(`` `grouped_gemm_bf16_wgrad(x_MK, dy_MN, offsets, out_dtype=torch.bfloat16)` ``) must bind to the
real ones, and nmoe-core's preset table must match `model_preset`. Mutation tests show that each
checker catches a renamed function, argument or config key. The whole file takes 20-30 s on 2
CPU cores (the four ``run`` blocks run as parallel subprocesses).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shlex
import sqlite3
import subprocess
import sys
import time
import tomllib
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ["README.md",
           *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("packages/*/README.md"))]
SEED = int(os.environ.get("NMOE_TEST_SEED") or time.time_ns() % 2**31)
REPLAY = f"seed {SEED} (replay with NMOE_TEST_SEED={SEED})"
RUN_TIMEOUT_S = 120


# --------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class Fence:
    """One fenced block of a README: ``index`` counts the README's fences from 0."""

    readme: str
    index: int
    lang: str
    text: str
    line: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.readme, self.index)


_FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


@cache
def fences(readme: str) -> tuple[Fence, ...]:
    text = (ROOT / readme).read_text()
    return tuple(
        Fence(readme, i, m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        for i, m in enumerate(_FENCE.finditer(text))
    )


@cache
def inline_spans(readme: str) -> tuple[str, ...]:
    """The inline code spans of a README's prose (fences removed); a span may wrap lines."""
    prose = _FENCE.sub("", (ROOT / readme).read_text())
    return tuple(" ".join(m.group(1).split()) for m in re.finditer(r"`([^`]+)`", prose))


# --------------------------------------------------------------------------------------------
# Classification of every fenced block


@dataclass(frozen=True)
class Example:
    """How one fenced block is checked (the kinds are listed in the module docstring)."""

    kind: str  # run | static | shell | toml | core_table | sqlite | synopsis | text
    starts: str  # the block's first line starts with this (pins the key to the block)
    why: str = ""  # static / text: why it is not run
    setup: str = ""  # run: inputs a fragment leaves to the reader
    check: str = ""  # run: compares the block's results with an independent computation
    stdout: str = ""  # run: every line the block prints fully matches it ("": prints nothing)


# The README quick-start model step (also nmoe-core's): the loss must equal the cross-entropy of
# the full float64 logits of a freshly built model (initialisation depends only on config and
# seed), be near ln(vocab) for an untrained model, and the optimizer step must have changed every
# parameter and lowered the loss on this batch. Tolerance 1e-4: the chunked float32 CE of 256
# targets against float64 (float32 rounding of values ~11 is ~1e-6 each).
CHECK_MODEL_STEP = """
import math
import torch.nn.functional as F
value = loss.item()
fresh = Transformer(model.cfg, seed=0)  # the block's config and seed
inputs, targets = tokens[:, :-1], tokens[:, 1:]
with torch.no_grad():
    logits = fresh.logits(fresh(inputs).hidden).double()
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    after = model(inputs, targets).loss.item()
assert abs(value - reference) < 1e-4, (value, reference)
ln_vocab = math.log(fresh.cfg.vocab_size)
assert abs(value - ln_vocab) < 1.0, f"untrained loss {value} is not near ln(vocab) {ln_vocab}"
fresh_params = dict(fresh.named_parameters())
unchanged = [n for n, p in model.named_parameters() if torch.equal(p, fresh_params[n])]
assert not unchanged, f"optimizer.step() left these parameters unchanged: {unchanged}"
assert after < value, f"loss after the step {after} is not below {value}"
print(f"CHECK loss {value!r}")
"""

# nmoe-comm's `local` example: out_TD and every gradient the comment promises (x_TD, weights_EDF,
# the router through gates_TK) against a float64 dense formula, sum_e coef_TE[:, e] * (x @ W_e)
# with coef_TE[t, e] = sum_k gates[t, k] [ids[t, k] == e]. The router's matrix is not named in
# the block; it is recovered from logits_TE by float64 least squares (x_TD has full column rank).
# Tolerance: float32 dot products of length 256 on O(1) values, ~1e-5 relative; 1e-4 of the max.
CHECK_COMM_LOCAL = """
x64 = x_TD.detach().double().requires_grad_()
w64 = weights_EDF.detach().double().requires_grad_()
router = torch.linalg.lstsq(x_TD.detach().double(), logits_TE.detach().double()).solution
gates64 = torch.sigmoid(x64 @ router).gather(1, expert_ids_TK)
onehot_TKE = torch.nn.functional.one_hot(expert_ids_TK, 8).double()
coef_TE = (gates64.unsqueeze(-1) * onehot_TKE).sum(1)
out64 = sum(coef_TE[:, e:e + 1] * (x64 @ w64[e]) for e in range(8))
out64.sum().backward()
for name, got, want in [("out_TD", out_TD, out64), ("x_TD.grad", x_TD.grad, x64.grad),
                        ("weights_EDF.grad", weights_EDF.grad, w64.grad)]:
    assert got is not None, f"{name} is None"
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), f"{name}: max error {err}"
print("CHECK ok")
"""

SETUP_COMM_REFERENCE = """
world, top_k, hidden = 2, 2, 64
sizes = [int(torch.randint(1, 40, ())), int(torch.randint(0, 40, ()))]  # rank 1 may send nothing
xs = [torch.randn(t, hidden) for t in sizes]
expert_ids = [torch.randint(0, 8, (t, top_k)) for t in sizes]
gates = [torch.rand(t, top_k) for t in sizes]
def f(x_RD):  # a row-wise expert function
    return torch.tanh(x_RD) * 2.0 + x_RD
"""

# The reference simulates both ranks: the rows each owner receives are the source rows of its
# experts' slots in (expert, src_rank, token, slot) order (bitwise); each output row is
# sum_k gates[t, k] * f(x[t]) (float64; f is row-wise, so routing must not change it).
CHECK_COMM_REFERENCE = """
local = 8 // world
for owner in range(world):
    rows = [xs[r][t] for e in range(owner * local, (owner + 1) * local) for r in range(world)
            for t in range(sizes[r]) for k in range(top_k) if int(expert_ids[r][t, k]) == e]
    want = torch.stack(rows) if rows else torch.empty(0, hidden)
    assert torch.equal(received[owner].x_RD, want), f"rows received by rank {owner}"
for r in range(world):
    want = (gates[r].double().sum(1, keepdim=True) * f(xs[r].double()))
    assert outs[r].shape == xs[r].shape
    if sizes[r]:  # a rank that sends nothing gets an empty output: nothing to compare
        err = (outs[r].double() - want).abs().max().item()
        assert err <= 1e-5 * (1 + want.abs().max().item()), f"rank {r}: max error {err}"
print("CHECK ok")
"""

GPU = "needs a CUDA GPU: the wrappers run the CUDA/CuTeDSL kernels only"
EXAMPLES: dict[tuple[str, int], Example] = {
    ("README.md", 0): Example("shell", "bash ci/install.sh && .venv/bin/n speedrun tiny"),
    ("README.md", 1): Example("shell", "bash ci/test.sh"),
    ("README.md", 2): Example("run", "import torch", check=CHECK_MODEL_STEP,
                              stdout=r"loss \d+\.\d{3}"),
    ("README.md", 3): Example("shell", "n train tiny steps=500"),
    ("packages/nmoe-comm/README.md", 0): Example("shell", "pip install"),
    ("packages/nmoe-comm/README.md", 1): Example(
        "run", "import torch", check=CHECK_COMM_LOCAL,
        stdout=r"moe dispatcher: local \(rank 0/1, experts 8, local 8, capacity 2048 rows\).*"),
    ("packages/nmoe-comm/README.md", 2): Example(
        "static", "torch.distributed.init_process_group",
        why="needs torchrun ranks on CUDA GPUs (the ipc backend)"),
    ("packages/nmoe-comm/README.md", 3): Example(
        "run", "from nmoe_comm import reference", setup=SETUP_COMM_REFERENCE,
        check=CHECK_COMM_REFERENCE),
    ("packages/nmoe-comm/README.md", 4): Example("shell", "pytest packages/nmoe-comm"),
    ("packages/nmoe-comm/README.md", 5): Example("shell", "pytest -m gpu packages/nmoe-comm"),
    ("packages/nmoe-comm/README.md", 6): Example("shell", "python packages/nmoe-comm/bench"),
    ("packages/nmoe-comm/README.md", 7): Example("shell", "NCCL_NVLS_ENABLE=0"),
    ("packages/nmoe-comm/README.md", 8): Example("shell", "NCCL_NVLS_ENABLE=0"),
    ("packages/nmoe-comm/README.md", 9): Example("shell", "nvcc -O3"),
    ("packages/nmoe-core/README.md", 0): Example("run", "import torch", check=CHECK_MODEL_STEP),
    ("packages/nmoe-eval/README.md", 0): Example("shell", "pip install"),
    ("packages/nmoe-eval/README.md", 1): Example("shell", "n eval RUN_DIR --tasks core"),
    ("packages/nmoe-eval/README.md", 2): Example(
        "static", "from nmoe_eval import run_in_training",
        why="runs inside a training job: model, config, ranks and all_reduce come from it"),
    ("packages/nmoe-eval/README.md", 3): Example("core_table", "task"),
    ("packages/nmoe-eval/README.md", 4): Example("core_table", "task"),
    ("packages/nmoe-kernels/README.md", 0): Example("shell", "pip install"),
    ("packages/nmoe-kernels/README.md", 1): Example("static", "import torch", why=GPU),
    ("packages/nmoe-kernels/README.md", 2): Example("static", "logits = hidden_chunk", why=GPU),
    ("packages/nmoe-kernels/README.md", 3): Example("static", "expert_ids_TK", why=GPU),
    ("packages/nmoe-kernels/README.md", 4): Example("static", "import torch", why=GPU),
    ("packages/nmoe-kernels/README.md", 5): Example("shell", "pytest packages/nmoe-kernels"),
    ("packages/nmoe-train/README.md", 0): Example("shell", "n train tiny steps=500"),
    ("packages/nmoe-train/README.md", 1): Example("toml", 'preset = "super"'),
    ("packages/nmoe-train/README.md", 2): Example("shell", "n speedrun super"),
    ("packages/nmoe-train/README.md", 3): Example("text", "step_0000100/",
                                                  why="a checkpoint directory layout"),
    ("packages/nmoe-train/README.md", 4): Example("sqlite", "sqlite3 RUN_DIR/metrics.db"),
    ("packages/nmoe-train/README.md", 5): Example("text", "DIR/manifest.json",
                                                  why="a dataset directory layout"),
    ("packages/nmoe-train/README.md", 6): Example("synopsis", "n data prep SOURCE"),
    ("packages/nmoe-train/README.md", 7): Example("shell", "bash ci/gpu.sh setup bench-train"),
}
_LANGS = {"run": {"python"}, "static": {"python"}, "shell": {"bash", "sh"}, "toml": {"toml"},
          "core_table": {""}, "sqlite": {""}, "synopsis": {""}, "text": {""}}


def _all_fences() -> list[Fence]:
    return [f for readme in READMES for f in fences(readme)]


def _fences_of(*kinds: str) -> list[Fence]:
    return [f for f in _all_fences() if f.key in EXAMPLES and EXAMPLES[f.key].kind in kinds]


def _ids(items: list[Fence]) -> list[str]:
    return [f"{f.readme}#{f.index}" for f in items]


def test_every_block_is_classified():
    found = {f.key: f for f in _all_fences()}
    missing = [f"{k[0]} block {k[1]} (line {found[k].line}, ```{found[k].lang}): "
               f"{found[k].text.splitlines()[0] if found[k].text else ''!r}"
               for k in found if k not in EXAMPLES]
    stale = [k for k in EXAMPLES if k not in found]
    assert not missing and not stale, (
        "README blocks without a decision in EXAMPLES (add an entry saying how each is checked):"
        f"\n  {chr(10).join(missing)}\nEXAMPLES entries without a block: {stale}")
    for key, example in EXAMPLES.items():
        fence = found[key]
        first = fence.text.splitlines()[0] if fence.text else ""
        assert fence.lang in _LANGS[example.kind], (
            f"{key}: a ```{fence.lang} block classified as {example.kind!r}")
        assert first.startswith(example.starts), (
            f"{key} (line {fence.line}) now starts {first!r}, not {example.starts!r}: a block was "
            "added, moved or changed; update EXAMPLES")
        if example.kind in ("static", "text"):
            assert example.why, f"{key}: say why it is not run"


# --------------------------------------------------------------------------------------------
# Runnable python blocks (subprocesses, started together: ~15 s on 2 cores)


def _script(fence: Fence) -> str:
    example = EXAMPLES[fence.key]
    return "\n".join([
        "import torch", f"torch.manual_seed({SEED})", example.setup, fence.text,
        "print('--- check ---')", example.check,
    ])


@cache
def _launched() -> dict[tuple[str, int], subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = {}
    for fence in _fences_of("run"):
        procs[fence.key] = subprocess.Popen(
            [sys.executable, "-c", _script(fence)], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return procs


@pytest.mark.parametrize("fence", _fences_of("run"), ids=_ids(_fences_of("run")))
def test_python_block_runs(fence):
    proc = _launched()[fence.key]
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{fence.readme} line {fence.line}: no result in {RUN_TIMEOUT_S} s; {REPLAY}")
    where = f"{fence.readme} line {fence.line}, {REPLAY}"
    assert proc.returncode == 0, f"{where}:\n{out}\n{err[-3000:]}"
    block_out, _, check_out = out.partition("--- check ---\n")
    example = EXAMPLES[fence.key]
    for line in block_out.splitlines():
        assert example.stdout and re.fullmatch(example.stdout, line), (
            f"{where}: the block printed {line!r}, not matching {example.stdout!r}")
    if example.stdout:
        assert block_out.strip(), f"{where}: the block printed nothing"
    printed = re.findall(r"^loss (\d+\.\d+)$", block_out, re.M)
    checked = re.findall(r"^CHECK loss (\S+)$", check_out, re.M)
    if printed:  # the printed loss is the block's loss rounded to 3 decimals
        assert abs(float(printed[0]) - float(checked[0])) <= 5e-4 + 1e-6, (printed, checked)
    assert "CHECK" in check_out, f"{where}: the check did not finish:\n{check_out}"


# --------------------------------------------------------------------------------------------
# Static API check of python blocks


class _Instance:
    """A value of a known nmoe class (from a constructor call or a return annotation)."""

    def __init__(self, cls: type):
        self.cls = cls


@dataclass(frozen=True)
class _Method:
    """A method of an nmoe class, called on an instance (``self`` is bound for it)."""

    cls: type
    name: str


def _is_nmoe(obj: object) -> bool:
    if isinstance(obj, types.ModuleType):
        return obj.__name__.startswith("nmoe_")
    return str(getattr(obj, "__module__", "") or "").startswith("nmoe_")


def _annotation_class(hint: object) -> _Instance | None:
    return _Instance(hint) if isinstance(hint, type) and _is_nmoe(hint) else None


def _field_names(cls: type) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
    return names


def _hints(obj: object) -> dict[str, object]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that names a TYPE_CHECKING-only import
        return {}


class ApiChecker:
    """Walks a block's statements in order, resolving nmoe names and binding nmoe calls."""

    def __init__(self) -> None:
        self.env: dict[str, object] = {}
        self.problems: list[str] = []
        self.calls: dict[tuple[int, int], str] = {}  # (line, column) -> the callable bound

    def problem(self, node: ast.AST, message: str) -> None:
        text = f"line {getattr(node, 'lineno', '?')}: {message}"
        if text not in self.problems:
            self.problems.append(text)

    def check(self, source: str) -> ApiChecker:
        for stmt in ast.parse(source).body:
            self.statement(stmt)
        return self

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self.imports(stmt)
            return
        for node in ast.walk(stmt):
            if isinstance(node, (ast.Call, ast.Attribute)):
                self.value(node)
        if isinstance(stmt, ast.Assign):
            value = self.value(stmt.value)
            for target in stmt.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        self.env.pop(name.id, None)
                if isinstance(target, ast.Name) and value is not None:
                    self.env[target.id] = value

    def imports(self, stmt: ast.Import | ast.ImportFrom) -> None:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name.startswith("nmoe_"):
                    module = self.module(stmt, alias.name)
                    top = alias.name.split(".")[0]
                    if module is not None:
                        self.env[alias.asname or top] = (
                            module if alias.asname else importlib.import_module(top))
            return
        if not (stmt.module or "").startswith("nmoe_") or stmt.level:
            return
        module = self.module(stmt, stmt.module)
        for alias in stmt.names if module is not None else ():
            obj = self.attribute(module, alias.name, stmt)
            if obj is not None:
                self.env[alias.asname or alias.name] = obj

    def module(self, node: ast.AST, name: str) -> types.ModuleType | None:
        try:
            return importlib.import_module(name)
        except ImportError as err:
            self.problem(node, f"cannot import {name}: {err}")
            return None

    def value(self, node: ast.AST) -> object | None:
        if isinstance(node, ast.Name):
            if node.id not in self.env and node.id.startswith("nmoe_"):  # implied `import nmoe_x`
                module = self.module(node, node.id)
                if module is not None:
                    self.env[node.id] = module
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.value(node.value)
            return None if base is None else self.attribute(base, node.attr, node)
        if isinstance(node, ast.Call):
            fn = self.value(node.func)
            if fn is None:
                return None
            self.bind(fn, node)
            return self.returns(fn)
        return None

    def attribute(self, base: object, name: str, node: ast.AST) -> object | None:
        if isinstance(base, types.ModuleType):
            if hasattr(base, name):
                return getattr(base, name)
            try:
                return importlib.import_module(f"{base.__name__}.{name}")
            except ImportError:
                self.problem(node, f"{base.__name__} has no attribute {name!r}")
                return None
        if isinstance(base, _Instance):
            cls = base.cls
            if hasattr(cls, name):
                static = inspect.getattr_static(cls, name)
                if isinstance(static, property):
                    return _annotation_class(_hints(static.fget).get("return"))
                return _Method(cls, name) if callable(static) else None
            if name in _field_names(cls):
                return _annotation_class(_hints(cls).get(name))
            self.problem(node, f"{cls.__module__}.{cls.__qualname__} has no attribute {name!r}")
            return None
        if isinstance(base, type) and _is_nmoe(base):
            if not hasattr(base, name):
                self.problem(node, f"{base.__module__}.{base.__qualname__} has no attribute "
                                   f"{name!r}")
            elif callable(getattr(base, name)):  # `Class.method(args)`: a call on an instance
                return _Method(base, name)
        return None

    def _callable(self, fn: object) -> tuple[object, bool, str] | None:
        """(the function whose signature to bind, whether to add ``self``, its name)."""
        if isinstance(fn, _Method):
            static = inspect.getattr_static(fn.cls, fn.name)
            if isinstance(static, staticmethod):
                return static.__func__, False, f"{fn.cls.__qualname__}.{fn.name}"
            if isinstance(static, classmethod):
                return getattr(fn.cls, fn.name), False, f"{fn.cls.__qualname__}.{fn.name}"
            return static, True, f"{fn.cls.__qualname__}.{fn.name}"
        if isinstance(fn, _Instance):  # calling a module instance runs its forward
            forward = getattr(fn.cls, "forward", None)
            return (forward, True, f"{fn.cls.__qualname__}.forward") if forward else None
        if callable(fn) and _is_nmoe(fn):
            return fn, False, f"{fn.__module__}.{fn.__qualname__}"
        return None

    def bind(self, fn: object, call: ast.Call) -> None:
        target = self._callable(fn)
        if target is None:
            return
        func, add_self, name = target
        self.calls[(call.lineno, call.col_offset)] = name
        keywords = [k.arg for k in call.keywords if k.arg is not None]
        positional = len(call.args) + (1 if add_self else 0)
        try:
            signature = inspect.signature(func)
            elided = any(isinstance(a, ast.Starred) or isinstance(a, ast.Constant) and a.value
                         is Ellipsis for a in call.args)  # `f(*xs)`, or `f(..., sync=False)`
            if elided or len(keywords) < len(call.keywords):
                signature.bind_partial(**dict.fromkeys(keywords))
            else:
                signature.bind(*[None] * positional, **dict.fromkeys(keywords))
        except TypeError as err:
            self.problem(call, f"{name}{signature}: {err}")
            return
        if name == "nmoe_comm.registry.create_dispatcher" and call.args and isinstance(
                call.args[0], ast.Constant):
            self.backend_options(call, str(call.args[0].value), keywords, signature)

    def backend_options(self, call, backend, keywords, signature) -> None:
        """``create_dispatcher(name, **options)``: the options go to that backend's class."""
        import nmoe_comm

        classes, todo = [], [nmoe_comm.Dispatcher]
        while todo:
            todo += todo[0].__subclasses__()
            classes.append(todo.pop(0))
        cls = next((c for c in classes if getattr(c, "name", None) == backend), None)
        if cls is None:
            self.problem(call, f"no dispatcher backend named {backend!r}")
            return
        params = inspect.signature(cls.__init__).parameters
        accepted = {p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        for key in set(keywords) - set(signature.parameters) - accepted:
            self.problem(call, f"dispatcher backend {backend!r} has no option {key!r}")

    def returns(self, fn: object) -> object | None:
        if isinstance(fn, type):
            return _Instance(fn) if _is_nmoe(fn) else None
        target = self._callable(fn)
        return None if target is None else _annotation_class(_hints(target[0]).get("return"))


_PYTHON = _fences_of("run", "static")


@pytest.mark.parametrize("fence", _PYTHON, ids=_ids(_PYTHON))
def test_python_block_api_exists(fence):
    checker = ApiChecker().check(fence.text)
    assert not checker.problems, (
        f"{fence.readme} block at line {fence.line} uses nmoe names or arguments that do not "
        "exist:\n  " + "\n  ".join(checker.problems))
    assert checker.calls, f"{fence.readme} line {fence.line}: no nmoe call was checked"


# (README, block, text, replacement, what the checker must report): the static check catches a
# renamed function, argument, method, field and backend option.
MUTATIONS = [
    ("packages/nmoe-kernels/README.md", 1, "quantize_fp8_1x128(x)", "quantize_fp8_1x129(x)",
     "quantize_fp8_1x129"),
    ("packages/nmoe-kernels/README.md", 1, "ue8m0=True", "ue8m0_scales=True", "ue8m0_scales"),
    ("packages/nmoe-kernels/README.md", 4, "(a, y, offsets)", "(a, y, offsets, 1, 2, 3)",
     "too many positional"),
    ("README.md", 2, "tokens_seen=0", "tokens=0", "tokens"),
    ("README.md", 2, ").loss", ").losses", "losses"),
    ("packages/nmoe-comm/README.md", 2, "max_send_rows=", "max_rows=", "max_rows"),
    ("packages/nmoe-comm/README.md", 2, "received.counts_E", "received.counts", "counts"),
    ("packages/nmoe-comm/README.md", 2, "dispatcher.destroy()", "dispatcher.close()", "close"),
    ("packages/nmoe-eval/README.md", 2, "max_batch_tokens=", "batch_tokens=", "batch_tokens"),
]


@pytest.mark.parametrize("readme, index, old, new, reported", MUTATIONS)
def test_api_check_catches_renames(readme, index, old, new, reported):
    text = fences(readme)[index].text
    assert old in text, f"mutation {old!r} no longer applies to {readme} block {index}"
    problems = ApiChecker().check(text.replace(old, new, 1)).problems
    assert any(reported in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# Shell commands


class Reached(Exception):
    """A stubbed command got past parsing and validation to its real work."""

    def __init__(self, what: str, payload: object):
        super().__init__(what)
        self.what, self.payload = what, payload


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    reached: Reached | None = None


def _stub(what: str):
    def stub(*args, **kwargs):
        raise Reached(what, (args, kwargs))

    return stub


class Shell:
    """Runs README command lines: ``n`` in-process with stubs, other programs checked."""

    def __init__(self, monkeypatch, capsys, tmp_path):
        import nmoe_eval.checkpoint
        import nmoe_eval.offline
        import nmoe_train.data.prep
        import nmoe_train.monitor
        import nmoe_train.report
        import nmoe_train.trainer

        self.capsys, self.tmp = capsys, tmp_path
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("NMOE_DATA", "/data")
        monkeypatch.delenv("NMOE_RUNS", raising=False)
        for module, name in [(nmoe_train.trainer, "Trainer"), (nmoe_train.data.prep, "prepare"),
                             (nmoe_train.monitor, "resolve_db_path"),
                             (nmoe_train.report, "resolve_db_path"),
                             (nmoe_eval.checkpoint, "load_checkpoint"),
                             (nmoe_eval.offline, "prep_core")]:
            monkeypatch.setattr(module, name, _stub(f"{module.__name__}.{name}"))

    def call(self, main, argv: list[str]) -> Outcome:
        self.capsys.readouterr()
        code, reached = None, None
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Reached as r:
            reached = r
        out, err = self.capsys.readouterr()
        return Outcome(code, out, err, reached)

    def n(self, argv: list[str]) -> Outcome:
        from nmoe_core.cli import main

        return self.call(main, argv)

    def help_text(self, verb_path: list[str]) -> str:
        outcome = self.n([*verb_path, "--help"])
        assert outcome.code == 0, f"`n {' '.join(verb_path)} --help` failed: {outcome.stderr}"
        return outcome.stdout


def _logical_lines(text: str) -> list[str]:
    """Command lines of a shell block: continuations joined, comment-only lines dropped."""
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _split(line: str) -> list[tuple[list[str], str]]:
    """``a && b  # comment`` -> [(argv of a, ""), (argv of b, "comment")]."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split, lexer.commenters = True, "#"
    comment = line.split("  #", 1)[1].strip() if "  #" in line else ""
    commands, current = [], []
    for token in lexer:
        if token in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [(argv, comment if i == len(commands) - 1 else "") for i, argv in enumerate(commands)]


def _toml_example() -> str:
    (fence,) = _fences_of("toml")
    return fence.text


def _dotted(tree: object, key: str) -> object:
    for part in key.split("."):
        assert isinstance(tree, dict) and part in tree, f"no {key!r} in the resolved config"
        tree = tree[part]
    return tree


def _matches(actual: object, expected: object) -> bool:
    """``expected`` (parsed from the README) agrees with the resolved config's ``actual``."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and _matches(actual[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(
            _matches(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=1e-9)
    return actual == expected


def _override_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _is_synopsis(args: list[str]) -> bool:
    return any(a.startswith("[") or a.endswith("]") and "=" not in a or "..." in a or "|" in a
               for a in args)


class CommandChecker:
    """Checks one command (argv) the way a README reader would run it."""

    def __init__(self, shell: Shell):
        self.shell = shell
        self.built: set[str] = set()  # programs an nvcc line of the block compiled (-o NAME)

    def __call__(self, argv: list[str], comment: str = "", inline: bool = False) -> None:
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes
            argv = argv[1:]
        program, args = Path(argv[0]).name, argv[1:]
        if argv[0] == f"./{program}" and program in self.built:
            return  # run what the block just compiled
        handler = {"n": self.n, "torchrun": self.torchrun, "python": self.python,
                   "pip": self.pip, "pytest": self.pytest, "ruff": self.ruff,
                   "bash": self.bash, "nvcc": self.nvcc}.get(program)
        assert handler is not None, (
            f"no check for `{program}` commands: teach CommandChecker how to check {argv}")
        handler(args, comment, inline)

    # n and torchrun -m nmoe_train ---------------------------------------------------------

    def n(self, args: list[str], comment: str, inline: bool, main=None) -> None:
        from nmoe_core.cli import discover_commands

        shell, command = self.shell, " ".join(["n", *args])
        verbs = discover_commands()
        if not args or args[0].startswith("-"):
            assert shell.n(args).code == 0, f"`{command}` failed"
            return
        verb = args[0]
        assert verb in verbs and verbs[verb].command is not None, (
            f"`{command}`: no verb {verb!r} (installed: {', '.join(verbs)})")
        if inline and len(args) == 1:  # a mention of the verb
            return
        subverb = args[1:2] if verb == "data" else []
        if _is_synopsis(args):
            flags = {a.strip("[]") for a in args if a.strip("[").startswith("--")}
            help_text = shell.help_text([verb, *subverb])
            unknown = [f for f in flags if f.split("=")[0] not in help_text]
            assert not unknown, f"`{command}`: {verb} has no option(s) {unknown}"
            return
        for arg in args:  # a TOML config the reader wrote: the README's example
            if arg.endswith(".toml") and not Path(arg).exists():
                Path(arg).write_text(_toml_example())
        outcome = shell.call(main, args) if main else shell.n(args)
        if comment.startswith("error:"):
            message = comment.removeprefix("error:").strip()
            assert outcome.code not in (0, None) and message in outcome.stderr, (
                f"`{command}` should fail with {message!r}; got code {outcome.code}, "
                f"stderr {outcome.stderr!r}")
            return
        assert outcome.reached or outcome.code == 0, (
            f"`{command}` failed (code {outcome.code}):\n{outcome.stderr}{outcome.stdout}")
        if verb in ("train", "speedrun") and (outcome.reached or "--print-config" in args):
            self.config(args, outcome, command)

    def config(self, args: list[str], outcome: Outcome, command: str) -> None:
        """The resolved config holds the preset or TOML file and every ``key=value``."""
        if outcome.reached:
            cfg = outcome.reached.payload[0][0].model_dump(mode="json")
        else:  # --print-config
            cfg = json.loads(outcome.stdout)
        positional = [a for a in args[1:] if not a.startswith("-")]
        spec = positional[0] if positional and "=" not in positional[0] else None
        if spec and spec.endswith(".toml"):
            tree = tomllib.loads(_toml_example())
            tree["data"]["sources"][0]["path"] = "/data/fineweb-gpt2"  # ${NMOE_DATA} expanded
            tree["runs_root"] = "runs"  # ${NMOE_RUNS:-runs}
            assert _matches(cfg, tree), f"`{command}`: the config differs from the TOML file"
        elif spec:
            assert cfg["preset"] == spec, f"`{command}`: preset {cfg['preset']!r}"
        for item in positional:
            if "=" in item:
                key, value = item.split("=", 1)
                got = _dotted(cfg, key)
                assert _matches(got, _override_value(value)), (
                    f"`{command}`: {key} is {got!r} in the resolved config, not {value}")

    def torchrun(self, args: list[str], comment: str, inline: bool) -> None:
        from nmoe_train.cli import main

        assert "-m" in args, f"torchrun {args}: only `-m nmoe_train` commands are checked"
        module, rest = args[args.index("-m") + 1], args[args.index("-m") + 2:]
        assert module == "nmoe_train", f"torchrun -m {module}: expected nmoe_train"
        assert rest and rest[0] in ("train", "speedrun", "data", "mon", "viz"), rest
        self.n(rest, comment, inline, main=main)

    # other programs ------------------------------------------------------------------------

    def python(self, args: list[str], comment: str, inline: bool) -> None:
        if args[0] == "-c":
            result = subprocess.run([sys.executable, "-c", args[1]], cwd=self.shell.tmp,
                                    capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
            assert result.returncode == 0, f"python -c {args[1]!r} failed:\n{result.stderr}"
            expect = [v for k, v in PYTHON_C_OUTPUT.items() if k in args[1]]
            assert expect, f"python -c {args[1]!r}: say what it prints in PYTHON_C_OUTPUT"
            assert re.fullmatch(expect[0], result.stdout.strip()), (args[1], result.stdout)
            return
        if args[:2] == ["-m", "torch.distributed.run"]:  # its options, then the script
            args = args[next(i for i, a in enumerate(args) if a.endswith(".py")):]
        elif args[0] == "-m":
            spec = importlib.util.find_spec(args[1])
            assert spec is not None, f"python -m {args[1]}: no such module"
            assert "__main__" in Path(spec.origin).read_text(), f"{args[1]} has no __main__"
            return
        script = ROOT / args[0]
        assert script.is_file(), f"python {args[0]}: no such file"
        source = script.read_text()
        for flag in (a for a in args[1:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{args[0]} has no option {flag}"

    def pip(self, args: list[str], comment: str, inline: bool) -> None:
        if args[:1] != ["install"]:
            return  # `pip download ...` in prose: nothing of ours to check
        for arg in args[1:]:
            if arg.startswith("-"):
                continue
            name, _, extra = arg.partition("[")
            if "/" in name:
                assert (ROOT / name).is_dir(), f"pip install {arg}: no such directory"
            elif name.startswith("nmoe-") and extra:
                pyproject = tomllib.loads((ROOT / "packages" / name / "pyproject.toml").read_text())
                extras = pyproject["project"].get("optional-dependencies", {})
                assert extra.rstrip("]") in extras, f"{name} declares no extra [{extra}"
            elif "==" in arg:  # pins of data packages: nmoe-eval must name the same versions
                assert arg in _package_sources(), f"{arg} is named nowhere in packages/"

    def pytest(self, args: list[str], comment: str, inline: bool) -> None:
        markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
            "ini_options"]["markers"]
        declared = {m.split(":")[0] for m in markers}
        previous = ""
        for arg in args:
            if previous == "-m":
                names = set(re.findall(r"\w+", arg)) - {"and", "or", "not"}
                assert names <= declared, f"pytest -m {arg}: undeclared marker"
            elif not arg.startswith("-") and previous != "-k":
                assert (ROOT / arg).exists(), f"pytest {arg}: no such path"
            previous = arg

    def nvcc(self, args: list[str], comment: str, inline: bool) -> None:
        sources = [a for a in args if a.endswith(".cu")]
        assert sources and all((ROOT / a).is_file() for a in sources), f"nvcc {args}"
        assert any("sm_90a" in a for a in args), f"nvcc {args}: build for Hopper (sm_90a)"
        if "-o" in args:
            self.built.add(args[args.index("-o") + 1])

    def ruff(self, args: list[str], comment: str, inline: bool) -> None:
        assert args[0] == "check" and all((ROOT / a).exists() for a in args[1:]), args

    def bash(self, args: list[str], comment: str, inline: bool) -> None:
        script = ROOT / args[0]
        assert script.is_file(), f"bash {args[0]}: no such script"
        if args[0] == "ci/gpu.sh":
            source = script.read_text()
            for stage in args[1:]:
                assert f"stage_{stage.replace('-', '_')}()" in source, f"no gpu.sh stage {stage}"
            for knob in re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", comment):  # BENCH_MICRO
                assert re.search(rf"\b{knob}\b", source), f"ci/gpu.sh never reads {knob}"


# `python -c` lines: what they print.
PYTHON_C_OUTPUT = {
    "import nmoe_kernels._C as C": r"\d+ (True [0-9a-z]+(,[0-9a-z]+)*|False)",  # no archs w/o nvcc
    "verify_checkpoint": r"\['step_0000100: not a directory'\]",  # RUN_DIR is a placeholder
}


@cache
def _package_sources() -> str:
    files = [*ROOT.glob("packages/*/pyproject.toml"), *ROOT.glob("packages/*/src/**/*.py")]
    return "\n".join(p.read_text() for p in files)


@pytest.fixture
def checker(monkeypatch, capsys, tmp_path):
    return CommandChecker(Shell(monkeypatch, capsys, tmp_path))


@pytest.mark.parametrize("fence", _fences_of("shell"), ids=_ids(_fences_of("shell")))
def test_shell_block(fence, checker):
    for line in _logical_lines(fence.text):
        for argv, comment in _split(line):
            checker(argv, comment)


_COMMAND_SPAN = re.compile(r"(n|\.venv/bin/n|torchrun|python|pip|pytest|bash) .*|n")


@pytest.mark.parametrize("readme", READMES)
def test_inline_commands(readme, checker):
    spans = [s for s in inline_spans(readme) if _COMMAND_SPAN.fullmatch(s)]
    for span in spans:
        for argv, comment in _split(span):
            checker(argv, comment, inline=True)


# A wrong key, value or verb must fail the shell check, not pass silently.
BROKEN_COMMANDS = [
    "n train tiny steps=500 optim.lr_dns=2e-3",
    "n train tiny steps=five",
    "n trian tiny",
    "n train tiny stepz=5      # error: unknown config key 'stepz'; did you mean stepz?",
    "n eval RUN_DIR --tasks core,gsm9k",
    "n data prep corpus.jsonl --out data/x --tokeniser gpt2",
    "torchrun --nproc_per_node 8 -m nmoe_train speedrun super parallel.expert_parallel=some",
    "bash ci/gpu.sh setup bench-trains",
    "bash ci/gpu.sh bench-train  # BENCH_VARIANT",
    "pip install 'nmoe-comm[nvshmem4]'",
    "nvcc -gencode=arch=compute_90a,code=sm_90a packages/nmoe-comm/bench/nvlink_prob.cu -o p",
    "./nvlink_probe 14336",  # not compiled by an nvcc line before it
]


@pytest.mark.parametrize("line", BROKEN_COMMANDS)
def test_shell_check_catches_broken_commands(line, checker):
    with pytest.raises(AssertionError):
        for argv, comment in _split(line):
            checker(argv, comment)


# --------------------------------------------------------------------------------------------
# TOML, output tables, SQL, synopses, prose names


def test_toml_block_loads(tmp_path, monkeypatch):
    from nmoe_train.config import load_toml

    monkeypatch.setenv("NMOE_DATA", "/data")
    monkeypatch.delenv("NMOE_RUNS", raising=False)
    path = tmp_path / "run.toml"
    path.write_text(_toml_example())
    cfg = load_toml(path)
    assert (cfg.preset, cfg.steps, cfg.runs_root, cfg.optim.lr_dense) == ("super", 4000, "runs",
                                                                           1.5e-3)
    assert [(s.path, s.weight) for s in cfg.data.sources] == [
        ("/data/fineweb-gpt2", 3.0), ("builtin:shakespeare", 1.0)]


@pytest.mark.parametrize("fence", _fences_of("core_table"), ids=_ids(_fences_of("core_table")))
def test_core_table_arithmetic(fence):
    """``centered = (acc - b) / (1 - b)`` with the task's random baseline, ``acc * n`` a count,
    and CORE the mean of the centered column, each to the table's 4 printed decimals."""
    from nmoe_eval.core import CORE_TASKS

    baseline = {s.label: s.baseline for s in CORE_TASKS}
    rows = re.findall(r"^core/(\w+)\s+(\d+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+[\d.]+s$", fence.text, re.M)
    (core,) = re.findall(r"^CORE = (-?[\d.]+)\s+\(mean centered accuracy over (\d+)/22", fence.text,
                         re.M)
    assert rows and len(rows) == int(core[1]), f"{len(rows)} rows, CORE over {core[1]} tasks"
    for label, n, acc, centered in rows:
        b = baseline[label]
        assert abs(float(acc) * int(n) - round(float(acc) * int(n))) < 1e-6, (label, acc, n)
        assert abs((float(acc) - b) / (1 - b) - float(centered)) <= 5e-5 + 1e-9, (label, b)
    mean = sum(float(r[3]) for r in rows) / len(rows)  # rows rounded (5e-5), CORE rounded (5e-5)
    assert abs(mean - float(core[0])) <= 1e-4 + 1e-9, (mean, core[0])


def test_sqlite_queries(tmp_path):
    from nmoe_train.metrics import MetricsDB

    (fence,) = _fences_of("sqlite")
    db_path = tmp_path / "metrics.db"
    db = MetricsDB(db_path, tensorboard=False)
    db.start_run("run-1", "readme", {}, "fingerprint", 1)
    rng = random.Random(SEED)
    losses = [(step, rng.uniform(2.0, 11.0)) for step in (10, 20, 30)]
    for step, value in losses:
        db.log(step, {"train/loss": value, "lr/dense": 1e-3})
    db.finish("completed", {})
    db.close()
    with sqlite3.connect(db_path) as conn:
        for line in _logical_lines(fence.text):
            program, path, query = shlex.split(line)
            assert program == "sqlite3" and path == "RUN_DIR/metrics.db", line
            rows = conn.execute(query).fetchall()
            if "train/loss" in query:
                assert rows == losses, rows
            else:
                assert rows and rows[0][:2] == ("run-1", "completed"), rows


def test_synopsis_flags_exist(checker):
    (fence,) = _fences_of("synopsis")
    commands = re.split(r"\n(?=n )", fence.text.strip())
    assert len(commands) == 3
    for command in commands:
        argv = shlex.split(command.replace("\n", " "), comments=True)
        checker(argv, "", inline=True)


_MISSING = object()


def _resolve_dotted(name: str) -> object:
    """The object a dotted ``nmoe_*`` name refers to (importing modules), or `_MISSING`."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    else:
        return _MISSING
    for part in parts[i:]:
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        except (ImportError, AttributeError):
            return _MISSING
    return obj


_NMOE_NAME = re.compile(r"(?<![\w./-])(nmoe_[a-z]+(?:\.[A-Za-z_]\w*)*)")


@pytest.mark.parametrize("readme", READMES)
def test_prose_nmoe_names_resolve(readme):
    names = sorted(set(_NMOE_NAME.findall((ROOT / readme).read_text())))
    unresolved = [n for n in names if _resolve_dotted(n) is _MISSING]
    assert not unresolved, f"{readme} names {unresolved}, which do not exist"


def _as_call(span: str) -> str:
    """A documented signature as a call: ``f(a, *, b, c=1) -> T`` -> ``f(a, b=..., c=1)``,
    ``f(x, capacity=, ...)`` -> ``f(x, capacity=..., ...)``; ``...`` elides arguments."""
    span = re.sub(r"\s*->.*$", "", span)
    span = re.sub(r"=\s*(?=[,)])", "=...", span)
    match = re.fullmatch(r"(.*?\()(.*)\)", span)
    if match and re.search(r"(?:^|,)\s*\*\s*,", match[2]):
        before, after = re.split(r"(?:^|,)\s*\*\s*,", match[2], maxsplit=1)
        keywords = [a if "=" in a else f"{a}=..." for a in (x.strip() for x in after.split(","))]
        span = match[1] + ", ".join(x for x in [before.strip(), *keywords] if x) + ")"
    return span


def _bare_name(head: str, namespaces: list[object]) -> object | None:
    """What a call's bare head (``generate``, ``Transformer``, ``param_kinds``) is, looked up in
    ``namespaces`` in order; a method of a namespace class becomes a call on an instance."""
    if head.startswith("nmoe_"):
        return None
    for namespace in namespaces:
        if getattr(namespace, "__name__", "") == head and isinstance(namespace, type):
            return namespace
        found = getattr(namespace, head, None)
        if callable(found) and not isinstance(found, types.ModuleType):
            return _Method(namespace, head) if isinstance(namespace, type) else found
    return None


def _prose_calls(readme: str) -> list[tuple[str, object | None]]:
    """Inline spans that are one call, each with what its bare head refers to: looked up in the
    modules and classes its enclosing headings name in backticks (``## Generation
    (`nmoe_core.generate`)``), innermost first, then in the README's package."""
    prose = _FENCE.sub("", (ROOT / readme).read_text())
    package = readme.split("/")[1].replace("-", "_") if readme.startswith("packages/") else None
    headings = [(m.start(), len(m[1]), m[0]) for m in re.finditer(r"^(#+) .*$", prose, re.M)]
    calls = []
    for span in re.finditer(r"`([^`]+)`", prose):
        text = _as_call(" ".join(span[1].split()))
        try:
            (statement,) = ast.parse(text).body
        except (SyntaxError, ValueError):
            continue
        if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)):
            continue
        enclosing: dict[int, str] = {}  # heading level -> heading
        for _, level, heading in (h for h in headings if h[0] < span.start()):
            enclosing = {k: v for k, v in enclosing.items() if k < level} | {level: heading}
        named = [_resolve_dotted(n) for heading in reversed(enclosing.values())
                 for n in _NMOE_NAME.findall(heading)]
        if package:
            named.append(importlib.import_module(package))
        head = re.match(r"[A-Za-z_]\w*", text)[0]
        calls.append((text, _bare_name(head, [n for n in named if n is not _MISSING])))
    return calls


@pytest.mark.parametrize("readme", READMES)
def test_prose_calls_bind(readme):
    """Documented calls and signatures in the prose (`grouped_gemm_bf16_wgrad(x_MK, dy_MN,
    offsets, out_dtype=torch.bfloat16)`) bind to the real signatures."""
    problems = []
    for call, head in _prose_calls(readme):
        checker = ApiChecker()
        if head is not None:
            checker.env[re.match(r"[A-Za-z_]\w*", call)[0]] = head
        problems += [f"`{call}`: {p}" for p in checker.check(call).problems]
    assert not problems, f"{readme}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("readme, old, new", [
    ("packages/nmoe-kernels/README.md", "out_dtype=torch.bfloat16", "dtype=torch.bfloat16"),
    ("packages/nmoe-core/README.md", "run_all_steps=False", "run_every_step=False"),
    ("packages/nmoe-core/README.md", "update_router_biases(loads, rate)",
     "update_router_biases(loads, rate, 1)"),
])
def test_prose_call_check_catches_renames(readme, old, new):
    ((call, head),) = [(c, h) for c, h in _prose_calls(readme) if old in c]
    checker = ApiChecker()
    checker.env[re.match(r"[A-Za-z_]\w*", call)[0]] = head
    assert checker.check(call.replace(old, new)).problems, call


def test_core_preset_table():
    """nmoe-core's preset table against `model_preset`."""
    from nmoe_core.presets import model_preset

    text = (ROOT / "packages/nmoe-core/README.md").read_text()
    rows = re.findall(r"^\| (tiny|super|ultra|moonlet|moonlight) \|(.*)\|$", text, re.M)
    assert [r[0] for r in rows] == ["tiny", "super", "ultra", "moonlet", "moonlight"]
    for name, cells in rows:
        dim, layers, heads, experts, inter, dense, attention, tokenizer = (
            c.strip() for c in cells.split("|"))
        cfg = model_preset(name)
        moe, att = cfg.moe, cfg.attention
        assert (int(dim), int(layers), int(heads)) == (cfg.dim, cfg.n_layers, att.n_heads), name
        assert [int(x) for x in experts.split("/")] == [
            moe.n_routed_experts, moe.n_activated_experts, moe.n_shared_experts], name
        assert (int(inter), int(dense)) == (moe.moe_inter_dim, moe.n_dense_layers), name
        assert attention.split()[0] == att.kind, name
        if "+" in attention:
            window = re.search(r"window (\d+), every (\d+)\w* global", attention)
            assert attention.split()[2] == att.local_kind and window, name
            assert (int(window[1]), int(window[2])) == (att.local_window, att.global_every), name
        else:
            assert att.global_every == 1 or att.local_kind == att.kind, name
        assert tokenizer.split()[0] == cfg.tokenizer, name
        vocab = re.search(r"vocab (\d+)", tokenizer)
        assert vocab is None or int(vocab[1]) == cfg.vocab_size, name

