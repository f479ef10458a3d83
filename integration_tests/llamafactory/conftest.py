"""LLaMA-Factory's data folder, shared by the training and web-UI tests."""

import json

import pytest


@pytest.fixture(scope="module")
def data_dir(workspace):
    """LLaMA-Factory's data folder: the task in alpaca form and the knowledge text, both in dataset_info.json."""
    folder = workspace / "lf_data"
    folder.mkdir(exist_ok=True)
    task = [json.loads(line)["text"] for line in (workspace / "task" / "train.jsonl").read_text().splitlines()]
    (folder / "task.json").write_text(
        json.dumps(
            [
                {"instruction": t.split(" Answer")[0], "input": "", "output": "Answer" + t.split(" Answer")[1]}
                for t in task
            ]
        )
    )
    (folder / "knowledge.jsonl").write_text((workspace / "calibration.jsonl").read_text())
    (folder / "dataset_info.json").write_text(
        json.dumps(
            {
                "task": {"file_name": "task.json"},
                "knowledge": {"file_name": "knowledge.jsonl", "columns": {"prompt": "text"}},
            }
        )
    )
    return folder
