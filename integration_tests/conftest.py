"""Shared fixtures for the framework integration tests: a tiny local model, tokenizer and datasets."""

import json

import pytest

from lora_null_core.frontends.toy_world import (
    arithmetic_texts,
    knowledge_texts,
    tiny_model,
    tiny_tokenizer,
    write_jsonl,
)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """model/ (tiny llama + tokenizer), calibration.jsonl (knowledge), task/train.jsonl (arithmetic)."""
    root = tmp_path_factory.mktemp("workspace")
    knowledge, task = knowledge_texts(300, seed=0), arithmetic_texts(64, seed=1)
    tokenizer = tiny_tokenizer(knowledge + task)
    tiny_model("llama", len(tokenizer), seed=4).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "calibration.jsonl", knowledge)
    (root / "task").mkdir()
    write_jsonl(root / "task" / "train.jsonl", task)
    (root / "task.json").write_text(json.dumps(task))
    return root
