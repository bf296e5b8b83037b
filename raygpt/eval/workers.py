"""Span scoring spread over Ray workers: the one part of the evals that knows Ray.

The driver loads the model and tokenizes; each worker (a Ray actor) builds the model
once from weights put in the object store once, then scores chunks handed out by an
ActorPool, so a slow worker takes fewer chunks. A chunk is a list of token spans, or a
callable that reads them where it runs (a perplexity sweep reads its windows from the
dataset on the worker, as training's samplers do, rather than ship a corpus through
the driver). Workers need no tokenizer and no access to the checkpoint or the hub.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray.util import ActorPool

from raygpt import errors
from raygpt.cluster import resources
from raygpt.eval import scoring
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.runtime import Runtime, resolve_device


@ray.remote
class _Scorer:
    def __init__(self, config: dict, weights: dict[str, torch.Tensor], dtype: str):
        # An actor given a GPU sees only that one (Ray sets CUDA_VISIBLE_DEVICES).
        use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        device = resolve_device("cuda" if use_cuda else "cpu")  # indexed: configure() sets it
        self.runtime = Runtime.create(device, dtype, compile="false")
        model = GPT(GPTConfig(**config))
        model.load_state_dict(weights)
        self.model = model.to(device).eval()

    def score(self, index: int, chunk: Any) -> tuple[int, list[tuple[float, int]]]:
        spans = chunk() if callable(chunk) else chunk
        return index, scoring.sum_logprobs(self.model, spans, runtime=self.runtime)


def plan(workers: int | None, cpus_per_worker: float | None, use_gpu: str) -> dict:
    """Workers and their resources on the joined cluster: by default one per GPU, else one
    per node with CPUs (a CPU worker runs torch on all the threads its CPUs give it, and
    every worker holds a copy of the model). Raises UserError when it cannot be placed."""
    gpu = resources.resolve_use_gpu(use_gpu)
    if workers is None:
        if gpu:
            workers = int(ray.cluster_resources().get("GPU", 0)) or 1
        else:
            nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
            workers = max(1, len(nodes))
    if cpus_per_worker is None:
        cpus_per_worker = resources.auto_cpus_per_worker(workers, gpu)
    # Ray retries an actor it cannot place forever: refuse up front instead.
    resources.check_fits(workers, cpus_per_worker, 1 if gpu else 0, what="this evaluation")
    return {"workers": workers, "cpus_per_worker": cpus_per_worker, "use_gpu": gpu}


def score(
    model: GPT,
    chunks: Sequence[Any],
    *,
    workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    dtype: str = "float32",
    label: str = "eval",
) -> list[list[tuple[float, int]]]:
    """Each chunk's span scores (scoring.sum_logprobs), in chunk order. `dtype` is one of
    config.DTYPES, resolved on each worker for its device (runtime.resolve_dtype)."""
    if not chunks:
        return []
    weights = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
    config = dataclasses.asdict(model.config)
    actors = [
        _Scorer.options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0).remote(
            config, weights, dtype
        )
        for _ in range(min(workers, len(chunks)))
    ]
    results: list[list[tuple[float, int]] | None] = [None] * len(chunks)
    done, last_print = 0, time.monotonic()
    try:
        pool = ActorPool(actors)
        jobs = pool.map_unordered(lambda a, job: a.score.remote(*job), enumerate(chunks))
        for index, scores in jobs:
            results[index] = scores
            done += 1
            if time.monotonic() - last_print > 30 or done == len(chunks):
                print(f"[raygpt] {label}: {done}/{len(chunks)} chunks scored", flush=True)
                last_print = time.monotonic()
    except ray.exceptions.RayError as err:
        found = errors.find_user_error(err)
        if found is not None:
            raise found from None
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
    return [r if r is not None else [] for r in results]
