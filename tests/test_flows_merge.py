"""The `merge` flow on real Prefect runs and a real MLflow store: lineage, evaluation and the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lorafleet.models.lora_weights import read_peft_adapter
from lorafleet.models.merging import MergeRecipe, merge_lora

from flow_helpers import copy_task_config, write_copy_task

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_merge_registers_lineage_is_evaluated_and_gated(home, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lorafleet.config import ConfigError
    from lorafleet.flows.finetune import finetune
    from lorafleet.flows.merge import merge
    from lorafleet.models.base import resolve_base_model
    from lorafleet.models.lora_weights import ProjectionShape
    from lorafleet.tasks.merge import MergeRefused

    data = write_copy_task(tmp_path / "copy.jsonl")
    parent = finetune(config=copy_task_config(data))
    assert parent["promoted"], parent["gate_reasons"]

    # cat of one adapter with itself at 0.5 + 0.5 is that adapter's delta again: it must score like it.
    first = merge(name="copy-merged", adapters=["copy:0.5", "copy@1:0.5"], method="cat")
    assert first["version"] == "1" and first["promoted"], first["gate_reasons"]
    adapter, base = first["metrics"]["adapter"], first["metrics"]["base"]
    assert adapter["field_f1"] > base["field_f1"]
    assert adapter["field_f1"] == pytest.approx(parent["metrics"]["adapter"]["field_f1"], abs=0.05)

    client = MlflowClient(tracking_uri=home.tracking_uri, registry_uri=home.tracking_uri)
    version = client.get_model_version("copy-merged", "1")
    assert version.tags["method"] == "merge"
    assert version.tags["merged_from"] == "models:/copy/1 x 0.5, models:/copy/1 x 0.5"
    assert json.loads(version.tags["merge_recipe"]) == {"method": "cat", "weights": [0.5, 0.5]}
    manifest = json.loads((Path(first["adapter_dir"]) / "lorafleet.json").read_text())
    assert [p["reference"] for p in manifest["lineage"]["parents"]] == ["models:/copy/1", "models:/copy/1"]
    assert "merge/lineage.json" in {f.path for f in client.list_artifacts(first["run_id"], "merge")}

    # The registered weights are merge_lora of the parents, written under PEFT's names.
    shape = ProjectionShape.from_hf_config(AutoConfig.from_pretrained(
        str(resolve_base_model("tiny-random-llama", home.model_cache_dir).path)))
    source = read_peft_adapter(Path(parent["adapter_dir"]), shape)
    expected = merge_lora([source, source], MergeRecipe(weights=(0.5, 0.5), method="cat"))
    written = read_peft_adapter(Path(first["adapter_dir"]), shape)
    assert written.rank == 2 * source.rank and written.scaling == 1.0
    saved = load_file(str(Path(first["adapter_dir"]) / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(expected.a)
    for key, tensor in expected.a.items():
        assert (written.a[key] == tensor).all() and (written.b[key] == expected.b[key]).all()

    # A weak merge (the adapter at 5%) is registered as challenger and held by the gate.
    second = merge(name="copy-merged", adapters=["copy:0.05"])
    assert second["version"] == "2" and not second["promoted"]
    aliases = {a: str(v) for a, v in client.get_registered_model("copy-merged").aliases.items()}
    assert aliases == {"champion": "1", "challenger": "2"}

    # Refusals name the argument or the parent, and register nothing.
    with pytest.raises(MergeRefused, match=r"merge\.adapters\.1 \('nope'\)"):
        merge(name="copy-bad", adapters=["copy:0.5", "nope:0.5"])
    with pytest.raises(ConfigError, match="density"):
        merge(name="copy-bad", adapters=["copy:0.5", "copy@1:0.5"], method="ties")
    assert not client.search_registered_models(filter_string="name = 'copy-bad'")
