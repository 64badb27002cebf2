"""Incremental detokenization and stop-string checking for one request (driver side).

``IncrementalDetokenizer`` turns generated token ids into text as they arrive:

* Text comes from the prefix/read offsets technique of TGI/vLLM: the tokens from
  ``prefix_offset`` on are decoded together, and the part after the text of
  ``tokens[prefix_offset:read_offset]`` is new.  While the decoded window ends in U+FFFD (a
  multi-byte UTF-8 character split across tokens) nothing is emitted; the bytes wait for the
  token that completes them.  When the request finishes (``final=True``) whatever is still
  pending is flushed, so the whole text equals ``tokenizer.decode(output_ids)``.
* The last few prompt tokens seed the window, so tokenizers whose decode depends on the
  context (SentencePiece's leading space) give the same text as they do in context.
* ``skip_special_tokens`` and ``spaces_between_special_tokens`` are handed to
  ``tokenizer.decode``.  Fast (Rust-backed) tokenizers ignore the latter, as in vLLM.
* Stop strings (``params.stop``) are looked for only in text that is new since the last check
  (plus ``len(stop) - 1`` characters before it).  The first occurrence, by end position, wins
  (ties: the one starting first).  The text is cut before the stop string, or after it when
  ``include_stop_str_in_output``.  Stop strings that end inside the text of the first
  ``min_tokens`` output tokens don't count (vLLM's behaviour).
* Unfinished outputs hold back the longest tail of the text that is a proper prefix of some
  stop string, so neither deltas nor cumulative text ever show text that a stop string later
  cuts.  On finish everything left is released.
* ``params.detokenize == False``: no text at all, and no stop strings.
"""

from __future__ import annotations

from typing import Any

from distllm.params import SamplingParams

# Prompt tokens used as context for the first generated tokens (vLLM uses 5 too).
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
_REPLACEMENT = "\ufffd"


def _fast_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer, when decode() adds nothing to it.

    With clean_up_tokenization_spaces=False (always, here) a fast tokenizer's decode() is the
    backend's decode; spaces_between_special_tokens is ignored by fast tokenizers anyway.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None or not hasattr(backend, "decode"):
        return None
    return backend


class IncrementalDetokenizer:
    """Detokenizes one request's output tokens incrementally and checks its stop strings.

    Public state: ``output_token_ids`` (all output tokens passed to ``update``),
    ``output_text`` (the text so far, already cut at a stop string).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams, lazy: bool = False) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.detokenize = bool(params.detokenize) and tokenizer is not None
        self.stop: list[str] = list(params.stop or []) if self.detokenize else []
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.output_token_ids: list[int] = []
        self.output_text = ""
        # Where the last emission ended (for deltas).
        self._emitted = 0
        self._stopped = False
        self._decode_kwargs = {
            "skip_special_tokens": params.skip_special_tokens,
            "spaces_between_special_tokens": params.spaces_between_special_tokens,
            "clean_up_tokenization_spaces": False,
        }
        # Fast tokenizers: call the Rust decoder directly. transformers' decode() wraps it in
        # type checks that cost more than the decode itself, twice per token per request.
        self._backend = _fast_backend(tokenizer)
        # Text from this offset on has not been searched for stop strings yet.
        self._stop_check_offset = 0
        # Tokens the window decodes: a few prompt tokens, then the output tokens.
        self._tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text: str | None = ""
        # Lazy: nobody reads the text before the request finishes (final-only outputs, no stop
        # strings), so it is decoded once then, instead of twice per token along the way.
        self.lazy = lazy and self.detokenize and not self.stop
        self._lazy_ids: list[int] = []
        if self.detokenize:
            ctx = list(prompt_token_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET:])
            if ctx:
                ctx_text = self._decode(ctx)
                # A prompt that ends inside a multi-byte character gives no usable context.
                if not ctx_text.endswith(_REPLACEMENT):
                    self._tokens = ctx
                    self._read_offset = len(ctx)
                    self._prefix_text = ctx_text

    # ---- decoding ------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.params.skip_special_tokens)
        return self.tokenizer.decode(ids, **self._decode_kwargs)

    def _decode_next(self, final: bool) -> str:
        """Text that the tokens appended since the last read add (maybe '' while pending)."""
        if self._read_offset >= len(self._tokens):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        prefix_text = self._prefix_text
        new_text = self._decode(self._tokens[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) and not final:
            # Nothing new yet (e.g. a skipped special token, or bytes of one character).
            return ""
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._prefix_text = None
        # Keep the window short: drop tokens before the prefix offset.
        if self._prefix_offset > 64:
            del self._tokens[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    # ---- public API ----------------------------------------------------------------------

    def update(self, new_token_ids: list[int], stop_terminated: bool = False, final: bool = False) -> str | None:
        """Append generated tokens; return the stop string that ends the output, or None.

        ``stop_terminated``: the last token is a stop token (EOS / stop_token_ids) that ended the
        request; as in vLLM it is kept in ``output_token_ids`` but not detokenized unless
        ``include_stop_str_in_output``.  ``final``: the request finishes with this update, so
        bytes held back for an incomplete character are flushed.
        """
        if self._stopped:
            self.output_token_ids.extend(new_token_ids)
            return None
        if not self.detokenize:
            self.output_token_ids.extend(new_token_ids)
            return None
        skipped = None
        if stop_terminated and new_token_ids and not self.include_stop_str_in_output:
            new_token_ids = list(new_token_ids)  # the caller's list stays as it is
            skipped = new_token_ids.pop()
        if self.lazy:
            self.output_token_ids.extend(new_token_ids)
            self._lazy_ids.extend(new_token_ids)
            if final:
                self._flush_lazy()
            if skipped is not None:
                self.output_token_ids.append(skipped)
            return None
        for tid in new_token_ids:
            self.output_token_ids.append(tid)
            self._tokens.append(tid)
            self.output_text += self._decode_next(final=False)
            if self.min_tokens and len(self.output_token_ids) <= self.min_tokens:
                # Stop strings inside the first min_tokens tokens' text don't count.
                self._stop_check_offset = len(self.output_text)
        if final:
            self.output_text += self._decode_next(final=True)
        if skipped is not None:
            self.output_token_ids.append(skipped)
        stop_string = None
        if self.stop and len(self.output_token_ids) > self.min_tokens:
            stop_string = self._check_stop_strings()
        return stop_string

    def _flush_lazy(self) -> None:
        """The text of every held-back token at once: decode(context + output) minus the context's
        text. Where a tokenizer's decode is not prefix-stable, the incremental path runs instead."""
        ids, self._lazy_ids = self._lazy_ids, []
        if not ids:
            return
        ctx_text = self._prefix_text or ""
        full = self._decode(self._tokens + ids)
        if full.startswith(ctx_text) and not full.endswith(_REPLACEMENT):
            self.output_text += full[len(ctx_text) :]
            return
        for tid in ids:
            self._tokens.append(tid)
            self.output_text += self._decode_next(final=False)
        self.output_text += self._decode_next(final=True)

    def _check_stop_strings(self) -> str | None:
        text = self.output_text
        start = self._stop_check_offset
        if start >= len(text):
            return None
        best: tuple[int, int, str] | None = None  # (end, begin, stop)
        for s in self.stop:
            i = text.find(s, max(0, start - len(s) + 1))
            if i == -1:
                continue
            cand = (i + len(s), i, s)
            if best is None or cand[:2] < best[:2]:
                best = cand
        self._stop_check_offset = len(text)
        if best is None:
            return None
        end, begin, s = best
        self.output_text = text[:end] if self.include_stop_str_in_output else text[:begin]
        self._stopped = True
        return s

    def _holdback(self) -> int:
        """Length of the longest tail of the text that could still become a stop string."""
        if not self.stop or self._stopped:
            return 0
        text = self.output_text
        best = 0
        for s in self.stop:
            k = min(len(s) - 1, len(text))
            while k > best:
                if text.endswith(s[:k]):
                    best = k
                    break
                k -= 1
        return best

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to put in the next output: all of it, or what is new since the last delta."""
        if not self.detokenize:
            return ""
        text = self.output_text
        end = len(text) if finished else len(text) - self._holdback()
        if not delta:
            return text[:end]
        if end <= self._emitted:
            return ""
        out = text[self._emitted : end]
        self._emitted = end
        return out

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)
