"""Evaluating one (model, pipeline, adapter, task) combination: answers, accuracy, cost, latency, memory."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..machine import LoadMeter
from ..proxyv.attach import provenance
from ..runtime.dispatch import input_device
from ..runtime.hooks import HookSet
from ..runtime.loading import build_prompt, model_inputs
from ..runtime.measure import Clock, peak_prefill_memory
from ..runtime.run import prepare
from .tasks import Task

#: samples whose prefill peak memory is measured (median reported); memory tracking is slow on CPU
MEMORY_SAMPLES = 3


def _inputs(processor: Any, model: Any, items: list[Any]) -> Any:
    return model_inputs(processor, model, [item.image for item in items],
                        [build_prompt(processor, item.question) for item in items])


@torch.no_grad()
def evaluate(
    model: Any,
    processor: Any,
    pipeline: Any,
    task: Task,
    limit: int | None = None,
    seed: int = 0,
    adapter: Any = None,
    batch_size: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    measure_memory: bool = True,
    split: str = "test",
) -> dict[str, Any]:
    """Answer ``limit`` test samples of ``task`` greedily with ``pipeline`` installed.

    Returns a dict with the canonical pipeline, accuracy and per-type accuracy, the analytic
    prefill FLOPs and saving (for the prompts' mean text length), median per-sample prefill
    latency (ms) and peak memory (MB), the image tokens entering each layer, how busy the machine was
    meanwhile (``threads``, ``cpu_cores``, ``loadavg_before``, ``loadavg_after``, ``others_cpu``, ``busy``:
    :meth:`lmmsqueeze.machine.LoadMeter.metrics`), and the per-sample answers (``uid``, ``qtype``,
    ``prediction``, ``answer``, ``score``).
    """
    part = measure(model, processor, pipeline, task, limit, seed, adapter, batch_size, on_progress,
                   measure_memory, split)
    return summarize(part, [part], task)


@torch.no_grad()
def measure(
    model: Any,
    processor: Any,
    pipeline: Any,
    task: Task,
    limit: int | None = None,
    seed: int = 0,
    adapter: Any = None,
    batch_size: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    measure_memory: bool = True,
    split: str = "test",
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """The raw measurements of :func:`evaluate` on the samples of one shard: ``shard=(rank, world)``
    answers samples ``rank``, ``rank + world``, ... (rank 0 also measures memory on the first samples of
    all). :func:`summarize` makes the row of one or several shards' parts. ``on_progress(done, total)``
    counts this shard's samples."""
    rank, world = shard
    n = task.size if limit is None else min(limit, task.size)
    everything = task.samples(split, n, seed)
    items = everything[rank::world]
    prepared = prepare(model, pipeline, adapter)  # the adapter is loaded once, not at every `apply`
    costs = prepared.costs()
    clock = Clock(input_device(model))
    answers: list[dict[str, Any]] = []
    latencies: list[float] = []
    text_tokens: list[float] = []
    marks: dict[str, Any] = {}

    meter = LoadMeter(torch.get_num_threads())  # how busy the machine was while this row was measured
    with meter, HookSet() as timers, prepared.apply() as run:
        # prefill = from the call (image encoding, pre-LLM stages, the prompt rewrite) to the end of
        # the first forward of the multimodal base model
        def prefill_end(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if "end" not in marks:
                marks["end"] = clock.mark()

        timers.post(prepared.family.base, prefill_end)
        for lo in range(0, len(items), batch_size):
            chunk = items[lo:lo + batch_size]
            inputs = _inputs(processor, model, chunk)
            geometries = costs.add(inputs)
            marks.clear()
            start = clock.mark()
            out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=False)
            costs.observe(run)
            latencies.append(clock.elapsed_ms(start, marks["end"]) / len(chunk))
            real = (int(inputs["attention_mask"].sum()) if "attention_mask" in inputs
                    else inputs["input_ids"].numel())
            # separators are text
            text_tokens.append((real - sum(g.image_tokens for g in geometries)) / len(chunk))
            predictions = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                 skip_special_tokens=True)
            for item, prediction in zip(chunk, predictions, strict=True):
                prediction = prediction.strip()
                answers.append({"uid": item.uid, "qtype": item.qtype, "prediction": prediction,
                                "answer": item.answer, "score": task.score(prediction, item.answer)})
            if on_progress:
                on_progress(len(answers), len(items))

    memory = []
    if measure_memory and rank == 0:
        for item in everything[:MEMORY_SAMPLES]:
            memory.append(peak_prefill_memory(prepared, dict(_inputs(processor, model, [item]))) / 2**20)
    return {"pipeline": prepared.plan.canonical, "costs": costs, "counts": costs.counts(),
            "answers": answers, "latencies": latencies, "text_tokens": text_tokens, "memory": memory,
            "provenance": provenance(adapter), "machine": meter.metrics()}


def summarize(own: dict[str, Any], parts: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    """The row of a run measured in ``parts`` (shard ``rank`` at index ``rank``; ``own``, one of them, holds
    the cost model): answers in sample order, accuracy, FLOPs and token counts over the images of every
    part, the median latency over every sample, the memory and machine load ``own`` measured."""
    world = len(parts)
    answers = [parts[i % world]["answers"][i // world] for i in range(sum(len(p["answers"]) for p in parts))]
    costs = own["costs"]
    for part in parts:
        if part is not own:
            costs.merge(part["counts"])
    latencies = [x for p in parts for x in p["latencies"]]
    text_tokens = [x for p in parts for x in p["text_tokens"]]
    memory = own["memory"]
    summary = task.summarize((a["qtype"], a["score"]) for a in answers)
    cost = costs.cost(round(statistics.mean(text_tokens)) if text_tokens else 0)
    tokens_per_layer = costs.tokens_per_layer()
    return {
        "pipeline": own["pipeline"],
        "task": task.name,
        "metric": task.metric,
        "n": len(answers),
        "accuracy": summary["overall"],
        "per_type": summary["per_type"],
        "prefill_flops": cost["prefill_flops"],
        "vanilla_prefill_flops": cost["vanilla_prefill_flops"],
        "saving": cost["saving"],
        "latency_ms": statistics.median(latencies) if latencies else None,
        "peak_memory_mb": statistics.median(memory) if memory else None,
        "image_tokens_per_layer": tokens_per_layer,
        "image_tokens_avg": sum(tokens_per_layer) / len(tokens_per_layer) if tokens_per_layer else None,
        **own["provenance"],
        **own["machine"],
        **({"processes": world} if world > 1 else {}),
        "answers": answers,
    }


def validator(
    processor: Any, task: Task, size: int, batch_size: int = 16
) -> Callable[[Any, Any, Any], float]:
    """Training's held-out score: accuracy on ``size`` validation samples of ``task`` (for
    :func:`lmmsqueeze.proxyv.train.train_proxyv`)."""
    def validate(model: Any, plan: Any, adapter: Any) -> float:
        return evaluate(model, processor, plan, task, limit=size, adapter=adapter, batch_size=batch_size,
                        measure_memory=False, split="val")["accuracy"]

    return validate


def loyalty(answers: list[dict[str, Any]], reference: list[dict[str, Any]]) -> float | None:
    """Share of samples whose prediction equals the reference run's on the same sample."""
    ref = {a["uid"]: a["prediction"] for a in reference}
    shared = [a for a in answers if a["uid"] in ref]
    if not shared:
        return None
    return sum(a["prediction"] == ref[a["uid"]] for a in shared) / len(shared)
