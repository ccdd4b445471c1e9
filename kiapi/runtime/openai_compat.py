"""OpenAI-compatible embeddings, HTTP-free: request checks and the response envelope.

``POST /v1/embeddings`` takes OpenAI's shape (``input`` as a string or a list of strings,
``encoding_format``, ``dimensions``) and kiapi's extensions (``truncate``, ``prompt_name``,
``instruction``). Vectors are unit length unless the model's sentence-transformers pipeline
has no Normalize module (then they are as sentence-transformers' ``encode`` returns them).
Each input becomes an ordinary ``embedding`` job
(:func:`kiapi.runtime.embedding.embedding_job`), so it shares the queue, the memory budget
and the batching of ``/v1/embedding`` and yields the same vector; this module only checks the
request and shapes the answer.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiapi.runtime.catalog import EMBEDDING
from kiapi.runtime.embedding import l2_normalize, wants_truncation, with_prompt
from kiapi.runtime.errors import BadRequest
from kiapi.runtime.registry import ModelSpec, Registry
from kiapi.runtime.worker import JobOutput

FLOAT, BASE64 = "float", "base64"
TOKEN_IDS_HINT = (
    "send the texts themselves; with LangChain's OpenAIEmbeddings set "
    "check_embedding_ctx_length=False (it otherwise sends OpenAI tokenizer ids)"
)


@dataclass(frozen=True)
class OpenAIEmbeddingRequest:
    spec: ModelSpec
    texts: tuple[str, ...]
    encoding_format: str = FLOAT
    dimensions: int | None = None
    truncate: bool = True


def parse_openai_request(registry: Registry, body: dict[str, Any]) -> OpenAIEmbeddingRequest:
    """Resolve the model and check the inputs (the schema has checked the types); raises
    :class:`BadRequest` (400) naming the field at fault."""
    spec = registry.resolve(EMBEDDING, body.get("model"))
    raw = body["input"]
    texts = [raw] if isinstance(raw, str) else list(raw)
    if any(not isinstance(t, str) for t in texts):
        raise BadRequest(
            "token-id input is not supported: the ids would be OpenAI's tokenizer's, "
            f"not {spec.name}'s",
            hint=TOKEN_IDS_HINT,
            param="input",
        )
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        where = "input" if isinstance(raw, str) else f"input[{empty[0]}]"
        raise BadRequest(f"{where} is an empty string; every input must have text", param="input")
    if "text" not in spec.features:
        raise BadRequest(f"model {spec.name!r} does not take text input", param="model")
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = int(dimensions)  # JSON Schema 2020-12: 64.0 is the integer 64
        check_dimensions(spec, dimensions)
    texts = [with_prompt(spec, text, body) for text in texts]
    return OpenAIEmbeddingRequest(
        spec,
        tuple(texts),
        body.get("encoding_format") or FLOAT,
        dimensions,
        truncate=wants_truncation(body),
    )


def check_dimensions(spec: ModelSpec, dimensions: int) -> None:
    if spec.dimensions_min is None:
        raise BadRequest(
            f"model {spec.name!r} does not support 'dimensions' (its vectors cannot be "
            "truncated without losing their meaning); leave it out",
            param="dimensions",
        )
    if dimensions < spec.dimensions_min:
        raise BadRequest(
            f"'dimensions' must be at least {spec.dimensions_min} for model {spec.name!r}",
            param="dimensions",
        )
    if spec.dimensions_max is not None and dimensions > spec.dimensions_max:
        raise BadRequest(
            f"'dimensions' is {dimensions} but {spec.name!r} makes vectors of "
            f"{spec.dimensions_max}",
            param="dimensions",
        )


def encode_vector(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """float32 values, or base64 of their little-endian bytes (what OpenAI's SDK decodes)."""
    if encoding_format == BASE64:
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def embeddings_response(
    request: OpenAIEmbeddingRequest, outputs: Sequence[JobOutput]
) -> dict[str, Any]:
    """OpenAI's envelope for the jobs' results, in input order. With ``dimensions`` each
    vector keeps its first ``dimensions`` components and is normalized again; asking for more
    than the model has is a 400."""
    data = []
    prompt_tokens = 0
    for index, output in enumerate(outputs):
        vector = output.result["embedding"]
        if request.dimensions is not None:
            if request.dimensions > len(vector):
                raise BadRequest(
                    f"'dimensions' is {request.dimensions} but {request.spec.name!r} makes "
                    f"vectors of {len(vector)}",
                    param="dimensions",
                )
            vector = vector[: request.dimensions]
            vector = l2_normalize(vector) if request.spec.normalize else vector
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_vector(vector, request.encoding_format),
            }
        )
        prompt_tokens += output.result["usage"]["prompt_tokens"]
    return {
        "object": "list",
        "data": data,
        "model": request.spec.name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_object(spec: ModelSpec, created: int) -> dict[str, Any]:
    """A servable model in OpenAI's shape, kiapi's details beside OpenAI's fields."""
    return {
        "id": spec.name,
        "object": "model",
        "created": created,
        "owned_by": spec.repo.split("/")[0] if "/" in spec.repo else "kiapi",
        "family": spec.family,
        "aliases": list(spec.aliases),
        "features": list(spec.features),
        "dimensions_min": spec.dimensions_min,
    }
