"""The embedding batch body on the real all-MiniLM-L6-v2: one forward pass for many requests,
each request's own vector, usage, timings and error."""

import time

import numpy as np
import pytest

from kiapi.runtime import engines
from kiapi.runtime.catalog import default_registry
from kiapi.runtime.embedding import (
    EmbeddingItem,
    embedding_job,
    estimated_tokens,
    run_embedding_batch,
)
from kiapi.runtime.errors import BadRequest, BudgetExceeded
from kiapi.runtime.memory import MemoryManager
from kiapi.runtime.registry import LoadedModel
from kiapi.runtime.worker import JobOutput

SPEC = default_registry().resolve("embedding", "minilm")


@pytest.fixture(scope="module")
def minilm():
    loaded = engines.load(SPEC)
    yield loaded
    loaded.unload()


class Poisoned:
    """The real model, refusing (as a client error) any call that contains the text 'poison'."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def embed(self, items):
        self.calls.append(len(items))
        if any(item.text == "poison" for item in items):
            raise BadRequest("poisoned item")
        return self.model.embed(items)


def memory_serving(model) -> MemoryManager:
    return MemoryManager(4.0, default_ttl_s=0, loader=lambda spec: LoadedModel(model, 0.1))


def test_one_call_embeds_every_member_with_its_own_usage_and_timings(minilm):
    texts = ["a short one", "a somewhat longer sentence about batching requests", "日本語"]
    received = time.perf_counter()
    outs = run_embedding_batch(
        memory_serving(minilm.model), SPEC, [(EmbeddingItem(text=t), received) for t in texts]
    )
    for text, out in zip(texts, outs, strict=True):
        assert isinstance(out, JobOutput)
        (alone,) = minilm.model.embed([EmbeddingItem(text=text)])
        vector = out.result["embedding"]
        assert float(np.dot(vector, alone.vector)) >= 0.9999
        assert out.result["usage"]["prompt_tokens"] == alone.prompt_tokens
        timings = out.result["timings"]
        assert timings["batch_size"] == 3
        assert timings["queue_s"] >= 0 and 0 < timings["embed_s"] <= timings["total_s"]


def test_a_poisoned_item_fails_alone_and_the_rest_are_embedded(minilm):
    model = Poisoned(minilm.model)
    members = [(EmbeddingItem(text=t), time.perf_counter()) for t in ("fine", "poison", "ok")]
    outs = run_embedding_batch(memory_serving(model), SPEC, members)
    assert isinstance(outs[0], JobOutput) and isinstance(outs[2], JobOutput)
    assert isinstance(outs[1], BadRequest) and "poisoned" in outs[1].detail
    assert model.calls == [3, 1, 1, 1]  # the batch, then each item alone


def test_no_model_fails_every_member():
    memory = MemoryManager(0.001, default_ttl_s=0, loader=lambda spec: LoadedModel(object(), 1))
    members = [(EmbeddingItem(text="x"), time.perf_counter())] * 2
    with pytest.raises(BudgetExceeded):
        run_embedding_batch(memory, SPEC, members)


def test_jobs_for_one_model_share_a_batch_key_and_cost_their_estimated_tokens(minilm):
    memory = memory_serving(minilm.model)
    short = embedding_job(memory, SPEC, EmbeddingItem(text="hello there"), 0.0)
    long = embedding_job(memory, SPEC, EmbeddingItem(text="x" * 3000), 0.0)
    other = embedding_job(memory, default_registry().find("qwen3-embedding-8b"), short.item[0], 0)
    assert short.key == long.key != other.key
    assert short.cost == estimated_tokens(EmbeddingItem(text="hello there")) < long.cost == 752


def test_a_job_may_run_inside_a_step_only_while_nothing_would_load_or_unload(minilm):
    """``ready_now`` lets the worker run the batch between a decode step's layers: only
    when its model is resident and using it evicts nothing (a load or an unload inside a step
    would stall every stream); past its idle TTL, ``acquire`` would evict and reload it."""
    now = [0.0]
    memory = MemoryManager(
        4.0, default_ttl_s=300, loader=lambda spec: LoadedModel(minilm.model, 0.1),
        clock=lambda: now[0],
    )  # fmt: skip
    job = embedding_job(memory, SPEC, EmbeddingItem(text="hello there"), 0.0)
    assert job.ready_now() is False
    with memory.use(SPEC):
        pass
    assert job.ready_now() is True
    now[0] = 400.0  # idle past its TTL: the next acquire sweeps it out first
    assert job.ready_now() is False
    memory.sweep()
    assert job.ready_now() is False
