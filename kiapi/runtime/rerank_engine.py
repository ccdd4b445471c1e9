"""The MLX cross-encoder engine (rerank): BERT or XLM-RoBERTa ``*ForSequenceClassification``
checkpoints in the Hugging Face layout. Imports MLX lazily; only the worker thread loads and
scores.

The encoder is mlx-embeddings' architecture (``bert``, ``xlm_roberta``), loaded strictly from
the checkpoint's ``bert.*`` / ``roberta.*`` tensors; the classification head is computed here
as transformers defines it:

* BERT: ``classifier(tanh(pooler.dense(h[CLS])))`` (the pooler is part of the encoder);
* XLM-RoBERTa: ``classifier.out_proj(tanh(classifier.dense(h[CLS])))``.

Scores: one label -> sigmoid of the logit (sentence-transformers' CrossEncoder default; an
``Identity`` activation in the config's ``sentence_transformers.activation_fn`` keeps the raw
logit); two labels -> the softmax probability of the second. Pairs are tokenized together
(``[CLS] query [SEP] document [SEP]``, token types 0/1 for BERT) and truncated longest-first
to the model's limit, as transformers' tokenizer does with ``truncation=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiapi.runtime.jobs import report_progress
from kiapi.runtime.mlx_engine import (
    _Embedder,
    architecture,
    length_groups,
    quantization_of,
    release_memory,
)
from kiapi.runtime.mlx_import import import_mlx
from kiapi.runtime.mlx_quantized import dequantized_float32
from kiapi.runtime.registry import LoadedModel, ModelSpec
from kiapi.runtime.weights import locate, read_json, weight_files

PREFIXES = {"bert": "bert.", "xlm-roberta": "roberta."}


def max_pair_tokens(folder: Path, config: dict[str, Any]) -> int:
    limits = [config.get("max_position_embeddings")]
    if config.get("model_type") == "xlm-roberta":  # positions start after the padding index
        limits[0] = (limits[0] or 514) - (config.get("pad_token_id", 1) + 1)
    limits.append(read_json(folder, "tokenizer_config.json").get("model_max_length"))
    usable = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < 10**7]
    return min(usable)


def float_head(head: dict[str, Any], quantization: dict | None) -> dict[str, Any]:
    """The classifier's tensors with any MLX-quantized matrix (``weight`` + ``scales``
    [+ ``biases``]) expanded back to float32: the head is a few small products."""
    if not quantization:
        return head
    out = {}
    for key, value in head.items():
        stem, _, leaf = key.rpartition(".")
        quantized = f"{stem}.scales" in head
        if quantized and leaf in ("scales", "biases"):
            continue  # folded into the weight below
        if quantized and leaf == "weight":
            value = dequantized_float32(
                value,
                head[f"{stem}.scales"],
                head.get(f"{stem}.biases"),
                quantization["group_size"],
                quantization["bits"],
                quantization.get("mode", "affine"),
            )
        out[key] = value  # the expanded weight, a bias, or a matrix stored as float
    return out


class CrossEncoder(_Embedder):
    def __init__(
        self, model, head: dict, tokenizer, *, kind: str, labels: int, sigmoid: bool, pad_id: int
    ):
        super().__init__(model)
        self.head, self.tokenizer, self.kind, self.pad_id = head, tokenizer, kind, pad_id
        self.labels, self.sigmoid = labels, sigmoid

    @classmethod
    def load(cls, folder: Path) -> CrossEncoder:
        mx = import_mlx()
        from tokenizers import Tokenizer

        config = read_json(folder, "config.json")
        kind = str(config.get("model_type", "")).replace("_", "-")
        if kind not in PREFIXES:
            raise ValueError(f"{folder}: no cross-encoder engine for model_type {kind!r}")
        # transformers leaves id2label out of config.json when it is its default: two labels
        labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
        if labels not in (1, 2):
            raise ValueError(f"{folder}: {labels} labels; a reranker has one (or two)")
        activation = str((config.get("sentence_transformers") or {}).get("activation_fn", ""))
        arch = architecture(kind)
        args = dict(config)
        if kind == "xlm-roberta":
            args["add_pooling_layer"] = False
        model = arch.Model(arch.ModelArgs.from_dict(args))
        weights: dict[str, Any] = {}
        for path in weight_files(folder):
            weights.update(mx.load(str(path)))
        prefix = PREFIXES[kind]
        quantization = quantization_of(config)
        head = float_head({k: v for k, v in weights.items() if k.startswith("classifier.")},
                          quantization)  # fmt: skip
        encoder = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        encoder = {k: v for k, v in encoder.items() if "position_ids" not in k}
        if quantization:  # an MLX-quantized folder: the layers it stores packed, quantized
            import mlx.nn as nn

            nn.quantize(
                model,
                group_size=quantization["group_size"],
                bits=quantization["bits"],
                mode=quantization.get("mode", "affine"),
                class_predicate=lambda path, _module: f"{path}.scales" in encoder,
            )
        model.load_weights(list(encoder.items()))  # strict: every encoder tensor, no other
        mx.eval(model.parameters(), head)
        model.eval()
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_pair_tokens(folder, config), strategy="longest_first")
        loaded = cls(model, head, tokenizer, kind=kind, labels=labels,
                     sigmoid=labels == 1 and not activation.endswith("Identity"),
                     pad_id=int(config.get("pad_token_id") or 0))  # fmt: skip
        loaded.weight_gb += sum(v.nbytes for v in head.values()) / 1024**3
        return loaded

    def score(self, query: str, documents: Sequence[str]) -> tuple[list[float], int]:
        """Relevance of each document to ``query`` (input order) and the pairs' tokens."""
        encodings = self.tokenizer.encode_batch([(query, d) for d in documents])
        lengths = [len(e.ids) for e in encodings]
        order = sorted(range(len(encodings)), key=lambda i: lengths[i])
        scores = [0.0] * len(encodings)
        for group in length_groups([lengths[i] for i in order]):
            members = [order[i] for i in group]
            for index, value in zip(
                members, self._score([encodings[i] for i in members]), strict=True
            ):
                scores[index] = float(value)
        release_memory(sum(lengths))
        return scores, sum(lengths)

    def _score(self, encodings) -> np.ndarray:
        mx = import_mlx()
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, np.int32)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            types[row, : len(e.ids)] = e.type_ids
            mask[row, : len(e.ids)] = 1
        ids_, mask_ = mx.array(ids), mx.array(mask)
        if self.kind == "bert":
            out = self.model(ids_, token_type_ids=mx.array(types), attention_mask=mask_)
            logits = (
                out.pooler_output @ self.head["classifier.weight"].T + self.head["classifier.bias"]
            )
        else:
            hidden = self.model(ids_, attention_mask=mask_).last_hidden_state[:, 0]
            h = mx.tanh(
                hidden @ self.head["classifier.dense.weight"].T + self.head["classifier.dense.bias"]
            )
            logits = (
                h @ self.head["classifier.out_proj.weight"].T
                + self.head["classifier.out_proj.bias"]
            )
        logits = logits.astype(mx.float32)
        if self.labels == 2:
            return np.array(mx.softmax(logits, axis=-1)[:, 1])
        return np.array(mx.sigmoid(logits[:, 0]) if self.sigmoid else logits[:, 0])


def load_reranker(spec: ModelSpec) -> LoadedModel:
    """The catalog's loader for rerank models (worker thread)."""
    folder = locate(spec.name, spec.source)
    report_progress(0.05, f"reading the weights of {spec.name} from {folder}")
    model = CrossEncoder.load(folder)
    report_progress(0.8, f"warming up {spec.name}")
    model.score("warm up", ["a first document", "a second one"])
    return LoadedModel(model=model, weight_gb=model.weight_gb, unload=model.unload)
