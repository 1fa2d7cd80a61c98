"""`eval_digest` (hdpo evaluate --reuse copies a result only under the same digest): every setting that can
change a sample enters it, and settings the backend never reads do not. Batch shapes change samples through
float round-off (hdpo.evaluate.batching_keys), so the transformers backend's batch size and vLLM's KV-cache
size must enter; the backend and the model's dtype must too."""
from __future__ import annotations

import pytest

from hdpo.config import from_dict
from hdpo.evaluate import eval_digest


@pytest.fixture()
def bench(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text('{"id": "1", "problem": "1+1", "answer": "2"}\n')
    return path


def digest(bench, **generation) -> str:
    dtype = generation.pop("dtype", "bfloat16")
    return eval_digest(from_dict({"generation": generation, "model": {"dtype": dtype}}), "toy", bench)


def test_the_batch_shapes_a_backend_samples_in_enter_the_digest(bench):
    tf = dict(backend="transformers")
    assert digest(bench, **tf, batch_size=16) != digest(bench, **tf, batch_size=3)
    vllm = dict(backend="vllm")
    assert digest(bench, **vllm, gpu_memory_utilization=0.5) != digest(bench, **vllm, gpu_memory_utilization=0.3)
    assert digest(bench, **vllm, vllm_cpu_kv_cache_gib=2.0) != digest(bench, **vllm, vllm_cpu_kv_cache_gib=4.0)


def test_settings_the_backend_never_reads_leave_the_digest_alone(bench):
    assert digest(bench, backend="vllm", batch_size=16) == digest(bench, backend="vllm", batch_size=3)
    tf = dict(backend="transformers")
    assert digest(bench, **tf, gpu_memory_utilization=0.5) == digest(bench, **tf, gpu_memory_utilization=0.3)


def test_backend_and_dtype_enter_the_digest(bench):
    assert digest(bench, backend="transformers") != digest(bench, backend="vllm")
    assert digest(bench, backend="vllm", dtype="bfloat16") != digest(bench, backend="vllm", dtype="float16")
