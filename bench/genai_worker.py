"""onnxruntime-genai's side of bench/onnx_vs_genai.py: run by the Python of genai's own virtual environment.

It imports only onnxruntime_genai and the standard library (never laas). Reads one line per round on stdin
("<salt> <tokens>"), measures that round and writes one JSON line: time to first token on the long
prompt, one stream's whole rate and decode rate after its first token, and a static batch of 4 streams.

Usage (by the bench): <genai venv>/bin/python bench/genai_worker.py MODEL_DIR PROMPT LONG_PROMPT
"""

from __future__ import annotations

import json
import sys
import time

import onnxruntime_genai as og  # type: ignore[import-not-found]


def main() -> int:
    folder, prompt, long_prompt = sys.argv[1:4]
    config = og.Config(folder)
    config.clear_providers()  # the CPU
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)

    def run(prompts: list[str], tokens: int) -> tuple[float, float, float]:
        """(seconds to the first token, all streams' tokens/s, decode tokens/s after the first token)."""
        ids = tokenizer.encode_batch(prompts)
        params = og.GeneratorParams(model)
        # min_length holds the end-of-sequence token back until every stream has `tokens` (as laas' ignore_eos)
        params.set_search_options(max_length=1024, min_length=ids.shape()[-1] + tokens, do_sample=False,
                                  batch_size=len(prompts))
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        for _ in range(tokens - 1):  # exactly `tokens` steps: a stream that ended early would flatter the rate
            if generator.is_done():
                raise SystemExit(f"genai ended a stream before {tokens} tokens: use a prompt that runs longer")
            generator.generate_next_token()
        end = time.perf_counter()
        decode = (tokens - 1) / (end - first) if tokens > 1 else 0.0
        return first - start, len(prompts) * tokens / (end - start), decode

    run(["warm up"], 8)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        salt, tokens = line.split()
        n = int(tokens)
        ttft = run([f"{salt} {long_prompt}"], 2)[0]
        _, one, decode = run([f"{salt} {prompt}"], n)
        four = run([f"{salt}{i} {prompt}" for i in range(4)], n)[1]
        print(json.dumps({"ttft_ms": ttft * 1000, "one": one, "decode": decode, "four": four}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
