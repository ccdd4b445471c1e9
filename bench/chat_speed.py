"""Single-stream chat speed on this machine: SmolLM2-135M-Instruct (the bundled GGUF) in
kiapi's engine, beside llama.cpp on the same file when its interpreter is given, and the
matvec that explains why kiapi serves the weights as float32 on the CPU.

    .venv/bin/python bench/chat_speed.py [--llamacpp /path/to/venv/bin/python]

The llama.cpp interpreter needs ``llama-cpp-python`` (its own venv, never kiapi's). Both
engines get the same ChatML prompt (37 tokens), 2 threads, greedy decoding, 48 new tokens;
each figure is the median of 3 runs. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, smollm2_gguf  # noqa: E402

from kiapi.runtime.mlx_import import import_mlx  # noqa: E402

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWrite a story about a cat.<|im_end|>\n<|im_start|>assistant\n"
)
NEW_TOKENS = 48
RUNS = 3

LLAMA_CPP = """
import json, sys, time
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
ids = llm.tokenize(sys.argv[2].encode(), add_bos=False, special=True)
runs = []
for _ in range(int(sys.argv[4])):
    llm.reset()
    started = time.perf_counter()
    first, count = None, 0
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == int(sys.argv[3]):
            break
    end = time.perf_counter()
    runs.append((first - started, (count - 1) / (end - first)))
print(json.dumps(runs))
"""


def matvec_ms() -> tuple[float, float]:
    """Milliseconds of one 1536x576 matvec (an MLP projection of SmolLM2): float32, 4-bit."""
    mx = import_mlx()
    x = mx.random.normal((1, 576))
    weight = mx.random.normal((1536, 576))
    packed, scales, biases = mx.quantize(weight, 32, 4)

    def timed(fn) -> float:
        mx.eval(fn())
        started = time.perf_counter()
        for _ in range(100):
            mx.eval(fn())
        return (time.perf_counter() - started) * 10

    return (
        timed(lambda: x @ weight.T),
        timed(lambda: mx.quantized_matmul(x, packed, scales, biases, True, 32, 4)),
    )


def kiapi_runs(path: Path) -> tuple[list[tuple[float, float]], float]:
    """(ttft_s, decode tokens/s) per run, and the resident GB of the loaded model."""
    from kiapi.runtime.llm_engine import Generator, Sampling, load_gguf

    mx = import_mlx()
    before = mx.get_active_memory()
    chat = load_gguf(path)
    resident_gb = (mx.get_active_memory() - before) / 1e9
    ids = chat.encode(PROMPT)
    runs = []
    for _ in range(RUNS):
        generator = Generator(chat)
        started = time.perf_counter()
        generator.add(ids, NEW_TOKENS, Sampling(temperature=0))
        first, count = None, 0
        while generator.active:
            count += len(generator.step())
            if first is None and count:
                first = time.perf_counter()
        end = time.perf_counter()
        generator.close()
        runs.append((first - started, (count - 1) / (end - first)))
    return runs, resident_gb


def llama_cpp_runs(python: str, path: Path) -> list[tuple[float, float]]:
    out = subprocess.run(
        [python, "-c", LLAMA_CPP, str(path), PROMPT, str(NEW_TOKENS), str(RUNS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return [tuple(run) for run in json.loads(out.stdout.strip().splitlines()[-1])]


def row(name: str, runs: list[tuple[float, float]], note: str = "") -> str:
    ttft = statistics.median(r[0] for r in runs)
    speed = statistics.median(r[1] for r in runs)
    return f"| {name} | {ttft * 1000:.0f} ms | {speed:.1f} | {note} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llamacpp", help="a Python interpreter with llama-cpp-python")
    args = parser.parse_args()
    path = smollm2_gguf()
    fp32, q4 = matvec_ms()
    runs, resident = kiapi_runs(path)
    print(f"SmolLM2-135M-Instruct Q4_1, one stream, {machine()}")
    print(f"1536x576 matvec through MLX: float32 {fp32:.2f} ms, 4-bit {q4:.2f} ms")
    print("| engine | time to first token (37-token prompt) | decode tokens/s | note |")
    print("|---|---|---|---|")
    print(row("kiapi (mlx-lm, float32 weights)", runs, f"{resident:.2f} GB resident"))
    if args.llamacpp:
        print(row("llama.cpp (llama-cpp-python, 2 threads)", llama_cpp_runs(args.llamacpp, path)))


if __name__ == "__main__":
    main()
