"""lmms-eval bridge: model `lmmsqueeze` for lmms-eval, the bundled task exported as an lmms-eval
task folder, and running lmms-eval tasks from `lmmsqueeze eval --task lmms:TASK`.

lmms-eval (the `eval` extra) is imported lazily; nothing here is needed for the native runner.
Registered through the entry point
``lmms_eval.models: lmmsqueeze = lmmsqueeze.evaluation.lmms_bridge:manifest``, so
``python -m lmms_eval --model lmmsqueeze --model_args pretrained=bundled,pipeline="pool" ...`` works.
Multi-GPU runs go through lmms-eval's launcher: ``accelerate launch -m lmms_eval --model lmmsqueeze ...``.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import torch

from ..errors import LmmsqueezeError
from ..runtime import load_model, prepare
from ..runtime.loading import build_prompt, model_inputs
from .tasks import get_task

TASK_NAME = "lmmsqueeze_bundled"


def _lmms_base() -> type:
    try:
        from lmms_eval.api.model import lmms  # optional dependency (the `eval` extra): imported lazily
    except ImportError:
        raise LmmsqueezeError("the lmms-eval bridge needs lmms-eval: pip install 'lmmsqueeze[eval]' "
                              "(then `pip uninstall -y torchvision` on a CPU-only torch)") from None
    return lmms


def manifest() -> Any:
    """The lmms-eval model manifest of `lmmsqueeze` (simple and chat classes)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # optional dependency; lmms-eval calls this

    return ModelManifest(
        model_id="lmmsqueeze",
        simple_class_path="lmmsqueeze.evaluation.lmms_bridge.LmmsqueezeLMM",
        chat_class_path="lmmsqueeze.evaluation.lmms_bridge.LmmsqueezeChat",
    )


class _Engine:
    """The model, processor and pipeline shared by the lmms-eval classes."""

    def __init__(self, pretrained: str, pipeline: str, adapter: str | None, device: str | None):
        self.model, self.processor = load_model(pretrained, device=device)
        self.prepared = prepare(self.model, pipeline, adapter)  # the adapter is loaded once for every request
        self.plan = self.prepared.plan

    @torch.no_grad()
    def generate(self, images: list[Any], text: str, max_new_tokens: int, until: list[str]) -> str:
        prompt = build_prompt(self.processor, text)
        inputs = model_inputs(self.processor, self.model, images, [prompt])
        with self.prepared.apply():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = self.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:
            if stop and stop in answer:
                answer = answer.split(stop)[0]
        return answer.strip()

    @torch.no_grad()
    def loglikelihood(self, images: list[Any], context: str, continuation: str) -> tuple[float, bool]:
        prompt = build_prompt(self.processor, context)
        full = model_inputs(self.processor, self.model, images[:1], [f"{prompt} {continuation}"])
        head = self.processor(images=images[0], text=prompt, return_tensors="pt")
        start = head["input_ids"].shape[1]
        with self.prepared.apply() as run:
            logits = self.model(**full).logits[0].float().log_softmax(-1)
            rows = run.output_positions[0]
        ids = full["input_ids"][0]
        row_of = torch.full_like(ids, -1)  # the logits row of every input column
        real = rows >= 0
        row_of[rows[real]] = torch.nonzero(real).flatten()
        cols = torch.arange(start, ids.shape[0], device=ids.device)
        predicting = row_of[cols - 1]  # token `col` is predicted by the row of column col-1
        scores = logits[predicting]
        total = float(scores.gather(1, ids[cols][:, None]).sum())
        return total, bool((scores.argmax(-1) == ids[cols]).all())


def _make_classes() -> tuple[type, type]:
    lmms = _lmms_base()
    from lmms_eval.api.instance import GenerationResult  # optional dependency, as in _lmms_base
    from lmms_eval.protocol import ChatMessages

    class LmmsqueezeLMM(lmms):
        """lmms-eval model `lmmsqueeze` (simple): ``pretrained=DIR_or_bundled,pipeline="...",adapter=DIR``."""

        is_simple = True

        def __init__(self, pretrained: str = "bundled", pipeline: str = "none", adapter: str | None = None,
                     device: str | None = None, batch_size: int | str = 1, **kwargs: Any) -> None:
            super().__init__()
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                device = None  # lmms-eval defaults to cuda; fall back to what this machine has
            if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # accelerate launch -m lmms_eval
                from accelerate import Accelerator  # lmms-eval's own dependency, as its models use it

                # lmms-eval gives each rank its share of the documents and gathers through `accelerator`
                self.accelerator = Accelerator()
                self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
                if self.accelerator.device.type == "cuda":
                    device = str(self.accelerator.device)  # one GPU per rank
            self.engine = _Engine(pretrained, pipeline, adapter, device or None)
            self.batch_size_per_gpu = int(batch_size)

        def generate_until(self, requests: list[Any]) -> list[Any]:
            out = []
            for req in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                text = self.engine.generate(visuals, context, int(gen_kwargs.get("max_new_tokens", 32)),
                                            list(gen_kwargs.get("until", []) or []))
                out.append(GenerationResult(text=text))
            return out

        def loglikelihood(self, requests: list[Any]) -> list[Any]:
            out = []
            for req in requests:
                context, continuation, doc_to_visual, doc_id, task, split = req.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                # lmms-eval 0.7.3 unwraps every response; a GenerationResult keeps the tuple intact
                out.append(GenerationResult(text=self.engine.loglikelihood(visuals, context, continuation)))
            return out

        def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
            raise NotImplementedError("lmmsqueeze evaluates single-round prompts (pipelines act at prefill)")

    class LmmsqueezeChat(LmmsqueezeLMM):
        """lmms-eval model `lmmsqueeze` (chat): images and text from the task's messages."""

        is_simple = False

        def generate_until(self, requests: list[Any]) -> list[Any]:
            out = []
            for req in requests:
                _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
                messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
                images, _, _ = messages.extract_media()
                text = " ".join(c.text for m in messages.messages if m.role == "user"
                                for c in m.content if c.type == "text")
                out.append(GenerationResult(text=self.engine.generate(
                    images, text, int(gen_kwargs.get("max_new_tokens", 32)),
                    list(gen_kwargs.get("until", []) or []))))
            return out

    return LmmsqueezeLMM, LmmsqueezeChat


def __getattr__(name: str) -> Any:  # the classes exist only when lmms-eval is installed
    if name in ("LmmsqueezeLMM", "LmmsqueezeChat"):
        simple, chat = _make_classes()
        globals().update(LmmsqueezeLMM=simple, LmmsqueezeChat=chat)
        return globals()[name]
    raise AttributeError(name)


_UTILS = '''
"""lmms-eval hooks of the exported lmmsqueeze bundled task (no lmmsqueeze import needed)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    prediction = results[0].strip().lower() if results else ""
    return {"exact_match": float(prediction == doc["answer"].strip().lower())}
'''


def export_task(directory: str | Path, limit: int | None = None, seed: int = 0) -> Path:
    """Write the bundled benchmark's test split as an lmms-eval task folder (parquet + YAML + utils)."""
    try:
        from datasets import Dataset, Features, Image, Value  # optional dependency (comes with lmms-eval)
    except ImportError:
        raise LmmsqueezeError("exporting an lmms-eval task needs the `datasets` package: pip install "
                              "'lmmsqueeze[eval]'") from None
    task = get_task("bundled")
    d = Path(directory).resolve()
    (d / "data").mkdir(parents=True, exist_ok=True)
    items = task.samples("test", min(limit or task.size, task.size), seed)
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string"),
                         "qtype": Value("string"), "uid": Value("string")})
    data = Dataset.from_dict({"image": [i.image for i in items], "question": [i.question for i in items],
                              "answer": [i.answer for i in items], "qtype": [i.qtype for i in items],
                              "uid": [i.uid for i in items]}, features=features)
    parquet = d / "data" / "test.parquet"
    data.to_parquet(str(parquet))
    (d / "utils.py").write_text(_UTILS.lstrip())
    (d / f"{TASK_NAME}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK_NAME}
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {parquet}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {task.max_new_tokens}
          until: ["</s>"]
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    return d


def run_lmms_task(model: str, pipeline: str, adapter: str | None, task: str, include_path: str | None,
                  limit: int | None) -> dict[str, Any]:
    """Run one lmms-eval task in-process; returns ``{"metric", "accuracy", "answers", "results"}``."""
    _lmms_base()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lmms_eval import evaluator  # optional dependency; after the offline defaults above
    from lmms_eval.tasks import TaskManager

    simple, _ = _make_classes()
    lm = simple(pretrained=model, pipeline=pipeline, adapter=adapter)
    manager = TaskManager("WARNING", include_path=include_path)
    if task not in manager.all_tasks:
        where = f" (include path {include_path!r})" if include_path else "; give --include-path"
        raise LmmsqueezeError(f"lmms-eval knows no task {task!r}" + where)
    out = evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                    log_samples=True, batch_size=1)
    if not out or task not in out.get("results", {}):
        raise LmmsqueezeError(f"lmms-eval returned no results for {task!r}")
    metrics = {k: v for k, v in out["results"][task].items()
               if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"}
    name, value = next(iter(metrics.items()))
    answers = []
    for s in out.get("samples", {}).get(task, []):
        resp = s.get("filtered_resps") or s.get("resps") or [""]
        pred = resp[0] if isinstance(resp[0], str) else str(resp[0])
        answers.append({"uid": str(s.get("doc_id")), "qtype": task, "prediction": pred.strip(),
                        "answer": str(s.get("target")), "score": float(s.get(name.split(",")[0], 0.0))})
    return {"metric": name, "accuracy": float(value), "answers": answers, "plan": lm.engine.plan}
