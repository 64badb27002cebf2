"""Prefix caching: prompts sharing a long prefix reuse its KV blocks
(mirrors vLLM's examples/offline_inference/prefix_caching.py)."""

from distllm import LLM, SamplingParams

prefix = (
    "You are an expert school principal, skilled in effectively managing faculty and staff. "
    "Draft 10-15 questions for a potential first grade Head Teacher for my K-12, all-girls', "
    "independent school that emphasizes community, joy in learning, and education for all. "
    "Applicant details below: "
)
prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is", "The future of AI is"]
generating_prompts = [prefix + p for p in prompts]
sampling_params = SamplingParams(temperature=0.0, max_tokens=24)


def main() -> None:
    regular_llm = LLM(enable_prefix_caching=False)
    regular = regular_llm.generate(generating_prompts, sampling_params)
    regular_texts = [o.outputs[0].text for o in regular]
    regular_llm.shutdown()

    prefix_llm = LLM(enable_prefix_caching=True)
    prefix_llm.generate(generating_prompts[0], sampling_params)  # warm the cache with the prefix
    cached = prefix_llm.generate(generating_prompts, sampling_params)
    for out in cached:
        print(f"Prompt: {out.prompt[-40:]!r}, cached tokens: {out.num_cached_tokens}, text: {out.outputs[0].text!r}")
    same = all(a == b.outputs[0].text for a, b in zip(regular_texts, cached))
    print(f"Generated answers are the same: {same}")
    if not same:
        raise SystemExit("prefix caching changed the outputs")


if __name__ == "__main__":
    main()
