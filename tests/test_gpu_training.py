"""QLoRA on CUDA end to end (bitsandbytes NF4 with double quantisation): run when a GPU is lent.

`make test` skips it on a machine without CUDA (the `gpu` marker); `pytest -m gpu` on a GPU machine runs it.
The CPU paths of the same flow are in tests/test_flows.py and tests/test_training.py.
"""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from flow_helpers import copy_task_config, write_copy_task

DEVICE = "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA on CUDA needs a CUDA device"),
    pytest.mark.usefixtures("prefect_api"),
]


@pytest.mark.timeout(1800)
def test_qlora_trains_and_evaluates_on_cuda(home, tmp_path):
    from lorafleet.flows.finetune import finetune
    from lorafleet.models.adapter_dir import read_manifest

    data = write_copy_task(tmp_path / "copy.jsonl")
    raw = {**copy_task_config(data, steps=60, promotion={"metric": "rouge_l"}), "method": "qlora", "device": DEVICE}
    summary = finetune(config=raw)

    assert summary["version"] == "1" and summary["promoted"], summary["gate_reasons"]
    assert summary["metrics"]["adapter"]["rouge_l"] > summary["metrics"]["base"]["rouge_l"]
    manifest = read_manifest(summary["adapter_dir"])
    assert manifest.method == "qlora" and manifest.training_config["device"] == DEVICE
    run = MlflowClient(tracking_uri=home.tracking_uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["config.method"] == "qlora"
