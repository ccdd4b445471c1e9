"""llama.cpp's tokens and greedy continuations for SmolLM2-135M-Instruct (the same GGUF file
kiapi serves), for kiapi's agreement test. Nothing of kiapi is imported.

    python3 -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python==0.3.16
    /tmp/llamacpp/bin/python scripts/reference/smollm2_llamacpp.py GGUF_FILE OUT_JSON [F32_GGUF]

``F32_GGUF`` (optional): the same model with every tensor dequantized to float32
(``smollm2_f32_gguf.py``); llama.cpp's greedy tokens on it are kept as ``greedy_f32``. On the
Q4_1 file llama.cpp multiplies with 8-bit-quantized activations, on the float32 file in floats.

Each prompt is chat-formatted text (ChatML, as the model's template writes it), tokenized by
llama.cpp with special tokens parsed; the continuation is 16 greedy tokens (top_k=1,
temperature 0), stopping early at <|im_end|>.
"""

from __future__ import annotations

import json
import sys

from llama_cpp import Llama

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous painting by Leonardo da Vinci.",
    "Give me a tip for learning to code.",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
STEPS = 16


def chatml(question: str) -> str:
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def greedy_tokens(llm: Llama, ids: list[int], end: int) -> list[int]:
    llm.reset()
    greedy = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if token == end or len(greedy) == STEPS:
            break
        greedy.append(token)
    return greedy


def main(gguf_path: str, out_path: str, f32_path: str | None = None) -> None:
    llm = Llama(gguf_path, n_ctx=512, n_threads=2, verbose=False, logits_all=False)
    f32 = Llama(f32_path, n_ctx=512, n_threads=2, verbose=False) if f32_path else None
    end = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)[0]
    results = []
    for question in QUESTIONS:
        text = chatml(question)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        result = {"text": text, "ids": ids, "greedy": greedy_tokens(llm, ids, end)}
        if f32 is not None:
            result["greedy_f32"] = greedy_tokens(f32, ids, end)
        results.append(result)
        for key in ("greedy", "greedy_f32"):
            if key in result:
                said = llm.detokenize(result[key]).decode(errors="replace")
                print(f"{key:>10} {question} -> {said}", file=sys.stderr)
    with open(out_path, "w") as fh:
        json.dump({"llamacpp": results, "end_token": end}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:4])
