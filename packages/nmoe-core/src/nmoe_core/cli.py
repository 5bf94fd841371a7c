"""The ``n`` command: a thin dispatcher over the verbs that installed nmoe packages provide.

Each package registers its verbs in the entry-point group ``nmoe.commands``; an entry point
resolves to a `Command` (``n train`` comes from nmoe-train, ``n serve`` from nmoe-serve, ...).
nmoe-core itself provides only ``n info``. For example, in a package's pyproject.toml:

    [project.entry-points."nmoe.commands"]
    train = "nmoe_train.cli:train_command"

Listing the verbs (``n``, ``n --help``) loads every entry point to read its summary, so the modules
that define commands must stay cheap to import: import torch and friends inside ``run``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ENTRY_POINT_GROUP", "Command", "discover_commands", "info_command", "main"]

ENTRY_POINT_GROUP = "nmoe.commands"


@dataclass(frozen=True)
class Command:
    """One verb of ``n``.

    Attributes:
        name: the verb (equal to the entry point's name).
        summary: one line for ``n --help``.
        run: called with the arguments after the verb; returns the process exit code.
    """

    name: str
    summary: str
    run: Callable[[list[str]], int]


@dataclass(frozen=True)
class _Entry:
    """A discovered verb: the loaded command, or why it failed to load."""

    name: str
    package: str
    command: Command | None
    error: str | None


def _load(ep: importlib.metadata.EntryPoint) -> _Entry:
    package = ep.dist.name if ep.dist is not None else "?"
    try:
        obj = ep.load()
    except Exception as e:  # a broken package must not take the other verbs down
        return _Entry(ep.name, package, None, f"cannot load {ep.value}: {type(e).__name__}: {e}")
    if not isinstance(obj, Command):
        return _Entry(ep.name, package, None,
                      f"{ep.value} is a {type(obj).__name__}, not a nmoe_core.cli.Command")
    if obj.name != ep.name:
        return _Entry(ep.name, package, None,
                      f"{ep.value} is named {obj.name!r} but registered as {ep.name!r}")
    return _Entry(ep.name, package, obj, None)


def discover_commands() -> dict[str, _Entry]:
    """Load every ``nmoe.commands`` entry point: ``{verb: entry}``, sorted by verb.

    Two packages registering the same verb is an error naming both.
    """
    entries: dict[str, _Entry] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry = _load(ep)
        if entry.name in entries and entries[entry.name].package != entry.package:
            raise RuntimeError(
                f"verb {entry.name!r} is registered by both {entries[entry.name].package} and "
                f"{entry.package}; uninstall one of them"
            )
        entries[entry.name] = entry
    return dict(sorted(entries.items()))


def _usage(entries: dict[str, _Entry]) -> str:
    lines = ["usage: n VERB [ARGS...]", "", "verbs:"]
    width = max((len(v) for v in entries), default=4)
    for verb, entry in entries.items():
        summary = entry.command.summary if entry.command else f"(broken: {entry.error})"
        lines.append(f"  {verb:<{width}}  {summary}  [{entry.package}]")
    if not entries:
        lines.append("  (none: install an nmoe package)")
    lines += ["", "Run `n VERB --help` for a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``n`` console script; returns the exit code.

    Args:
        argv: the arguments after ``n`` (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        entries = discover_commands()
    except RuntimeError as e:
        print(f"n: {e}", file=sys.stderr)
        return 2
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(entries))
        return 0
    verb, rest = args[0], args[1:]
    if verb not in entries:
        close = difflib.get_close_matches(verb, list(entries), n=1)
        hint = f" Did you mean `n {close[0]}`?" if close else ""
        print(f"n: unknown verb {verb!r}.{hint} Run `n --help` for the list.", file=sys.stderr)
        return 2
    entry = entries[verb]
    if entry.command is None:
        print(f"n {verb} (from {entry.package}) is broken: {entry.error}", file=sys.stderr)
        return 1
    return int(entry.command.run(rest) or 0)


# ---------------------------------------------------------------------------------------------
# n info


def _nmoe_distributions() -> list[tuple[str, str, str]]:
    """``(name, version, location)`` of every installed ``nmoe-*`` distribution, sorted."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().replace("_", "-").startswith("nmoe-"):
            location = str(dist.locate_file(""))
            found[name] = (name, dist.version, location)
    return [found[k] for k in sorted(found)]


def _kernels_line() -> str:
    try:
        c_module = importlib.import_module("nmoe_kernels._C")
    except ImportError as e:
        return f"not built ({e})"
    with_cuda = getattr(c_module, "WITH_CUDA", "?")
    archs = getattr(c_module, "CUDA_ARCHS", "?")
    abi = getattr(c_module, "ABI_VERSION", "?")
    return f"built, ABI {abi}, WITH_CUDA={with_cuda}, CUDA_ARCHS={archs}"


def _cutlass_line() -> str:
    try:
        import cutlass  # noqa: F401  (CuTeDSL, from nvidia-cutlass-dsl)
    except Exception as e:  # CuTeDSL raises more than ImportError when its runtime is missing
        return f"not importable ({type(e).__name__}: {e})"
    try:
        version = importlib.metadata.version("nvidia-cutlass-dsl")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return f"importable (nvidia-cutlass-dsl {version})"


def _comm_line() -> str:
    try:
        import nmoe_comm
    except ImportError:
        return "nmoe-comm not installed"
    backends = getattr(nmoe_comm, "available_backends", None)
    if backends is None:
        return "nmoe-comm installed (no available_backends())"
    return ", ".join(backends()) or "none"


def _torch_lines() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["torch: not installed"]
    lines = [f"torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"gpu {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("gpu: none visible")
    return lines


def _run_info(args: list[str]) -> int:
    if args:
        if args[0] in ("-h", "--help"):
            print("usage: n info\n\nVersions of nmoe packages, Python, torch, the GPUs and which "
                  "kernel / comm backends can run.")
            return 0
        print(f"n info: takes no arguments, got {args}", file=sys.stderr)
        return 2
    lines = [f"{name} {version} ({location})" for name, version, location in _nmoe_distributions()]
    lines.append(f"python: {platform.python_version()} ({sys.executable})")
    lines += _torch_lines()
    lines.append(f"nmoe_kernels._C: {_kernels_line()}")
    lines.append(f"cutlass (CuTeDSL): {_cutlass_line()}")
    lines.append(f"comm backends: {_comm_line()}")
    print("\n".join(lines))
    return 0


info_command = Command(
    name="info",
    summary="versions of nmoe packages, Python, torch, CUDA, the GPUs and available backends",
    run=_run_info,
)
