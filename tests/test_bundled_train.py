"""A short run of the bundled-model training script on a tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmmsqueeze.bundled import load_bundled, prompt
from lmmsqueeze.bundled.model import IMAGE_ID, IMAGE_TOKENS
from lmmsqueeze.bundled.train import main
from lmmsqueeze.evaluation.tasks import bundled as task

TINY = [
    "--steps", "4", "--eval-every", "2", "--eval-size", "10", "--batch", "2", "--turns", "3", "--warmup", "2",
    "--attn-layer", "0", "--attn-heads", "1",
    "--text-hidden", "32", "--text-layers", "1", "--text-heads", "2", "--text-mlp", "64",
    "--vision-hidden", "32", "--vision-layers", "1", "--vision-heads", "2", "--vision-mlp", "64",
    "--threads", "1", "--quiet",
]  # fmt: skip


def test_short_training_run_writes_loadable_checkpoint_and_log(tmp_path: Path) -> None:
    out, log = tmp_path / "weights", tmp_path / "log.jsonl"
    main([*TINY, "--out", str(out), "--log", str(log)])

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[-1]["images"] == 8  # 4 steps x batch 2
    assert set(records[0]["val_per_type"]) == set(task.QUESTION_TYPES)
    assert records[0].get("saved") is True
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "training.json").read_text())["model"]["text_hidden"] == 32

    model, processor = load_bundled(path=out)
    sample = task.samples("test", 1)[0]
    inputs = processor(images=sample.image, text=prompt(sample.question), return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == IMAGE_TOKENS  # 12 x 12 patches of 8 px
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3)
    assert generated.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_prompt_matches_chat_template() -> None:
    from lmmsqueeze.bundled.model import build_processor

    processor = build_processor()
    question = "is there a ring"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert processor.tokenizer(rendered)["input_ids"] == processor.tokenizer(prompt(question))["input_ids"]
