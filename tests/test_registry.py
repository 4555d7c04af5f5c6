"""The MLflow Model Registry flow on a real SQLite store in tmp_path (no mocks). Runs in ~6 s.

Adapters here are fake folders with a valid `lorafleet.json` and a stand-in weights file: the
registry only moves folders, so a real PEFT save would add seconds and test nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lorafleet.models.adapter_dir import AdapterManifest, BaseModelRef, TaskInfo, write_manifest
from lorafleet.settings import Settings
from lorafleet.tasks.registry import (
    CHALLENGER,
    CHAMPION,
    AdapterNotFound,
    InvalidRegistration,
    NoPreviousChampion,
    champion_history,
    download_adapter,
    get_champion,
    get_version,
    latest_version,
    list_adapters,
    metric_tags,
    promote,
    register_adapter,
    rollback,
    set_champion,
    version_metrics,
)
from lorafleet.tasks.tracking import RunLogger, ensure_experiment, start_run

pytestmark = pytest.mark.usefixtures("empty_cwd")  # conftest: MLflow must write nothing to ./


def make_adapter(folder: Path, name: str, *, f1: float = 0.5, weights: str = "w") -> Path:
    folder.mkdir(parents=True)
    write_manifest(folder, AdapterManifest(
        name=name, method="lora", base_model=BaseModelRef(id="tiny-random-llama", revision="rev123"),
        tokenizer_hash="tok", task=TaskInfo(name=name, output_format="json"), data_fingerprint="fp" + name,
        metrics={"field_f1": f1}))
    (folder / "adapter_model.safetensors").write_text(weights)
    return folder


def logged_run(client: MlflowClient, settings: Settings, name: str, *, f1: float = 0.5,
               weights: str = "w", with_adapter: bool = True) -> str:
    run_id = start_run(client, ensure_experiment(client, name, settings), run_name="finetune", tags={})
    logger = RunLogger(client, run_id)
    if with_adapter:
        src = make_adapter(settings.home / "src" / run_id, name, f1=f1, weights=weights)
        logger.log_artifacts(src, "adapter")
    logger.finish()
    return run_id


def register(client: MlflowClient, settings: Settings, name: str = "viggo", **kwargs) -> str:
    run_id = logged_run(client, settings, name, **kwargs)
    return str(register_adapter(client, name=name, run_id=run_id, tags={}).version)


def versions_of(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def test_register_sets_source_tags_and_challenger(client: MlflowClient, settings: Settings) -> None:
    run_id = logged_run(client, settings, "viggo", f1=0.61)
    version = register_adapter(client, name="viggo", run_id=run_id, description="first try",
                               tags={"metric.exact_match": "0.4", "flow": "x"})
    assert str(version.version) == "1"
    assert version.source == f"runs:/{run_id}/adapter" and version.run_id == run_id
    assert version.description == "first try" and version.status == "READY"
    assert version.tags == {"base_model": "tiny-random-llama", "base_model_revision": "rev123",
                            "method": "lora", "task": "viggo", "data_fingerprint": "fpviggo",
                            "metric.field_f1": "0.61", "metric.exact_match": "0.4", "flow": "x"}
    assert client.get_registered_model("viggo").aliases == {CHALLENGER: 1}

    second = register(client, settings, f1=0.7)
    assert second == "2"
    assert str(client.get_model_version_by_alias("viggo", CHALLENGER).version) == "2"
    assert get_champion(client, "viggo") is None


def test_run_without_adapter_artifact_is_refused_and_leaves_nothing(client: MlflowClient,
                                                                     settings: Settings) -> None:
    run_id = logged_run(client, settings, "viggo", with_adapter=False)
    with pytest.raises(InvalidRegistration, match="no `adapter/lorafleet.json` artifact"):
        register_adapter(client, name="viggo", run_id=run_id, tags={})
    assert client.search_registered_models() == []
    with pytest.raises(InvalidRegistration, match="no such MLflow run"):
        register_adapter(client, name="viggo", run_id="0" * 32, tags={})


def test_invalid_manifest_is_refused(client: MlflowClient, settings: Settings, tmp_path: Path) -> None:
    run_id = start_run(client, ensure_experiment(client, "viggo", settings), run_name="bad", tags={})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lorafleet.json").write_text('{"name": "viggo"}')
    RunLogger(client, run_id).log_artifacts(bad, "adapter")
    with pytest.raises(InvalidRegistration, match="not a valid manifest"):
        register_adapter(client, name="viggo", run_id=run_id, tags={})
    assert client.search_model_versions("name='viggo'") == []


def test_invalid_name_is_refused(client: MlflowClient, settings: Settings) -> None:
    run_id = logged_run(client, settings, "viggo")
    with pytest.raises(ValueError, match="'Viggo@2' is not valid"):
        register_adapter(client, name="Viggo@2", run_id=run_id, tags={})


class AliasFailsClient(MlflowClient):
    """A real client whose alias call fails, as a server error after the version exists would."""

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        raise MlflowException("injected: alias service unavailable")


def test_failure_after_version_is_created_deletes_it(client: MlflowClient, settings: Settings) -> None:
    assert register(client, settings) == "1"
    failing = AliasFailsClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    run_id = logged_run(client, settings, "viggo")
    with pytest.raises(MlflowException, match="injected"):
        register_adapter(failing, name="viggo", run_id=run_id, tags={})
    assert versions_of(client, "viggo") == ["1"]
    assert client.get_registered_model("viggo").aliases == {CHALLENGER: 1}

    # a bad tag key fails after the version exists too
    with pytest.raises(MlflowException, match="key"):
        register_adapter(client, name="viggo", run_id=run_id, tags={"": "empty key"})
    assert versions_of(client, "viggo") == ["1"]
    # MLflow never reuses a deleted version number
    assert str(register_adapter(client, name="viggo", run_id=run_id, tags={}).version) == "4"
    assert versions_of(client, "viggo") == ["1", "4"]


def test_failed_first_registration_removes_the_new_registered_model(client: MlflowClient,
                                                                    settings: Settings) -> None:
    failing = AliasFailsClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    run_id = logged_run(client, settings, "fresh")
    with pytest.raises(MlflowException, match="injected"):
        register_adapter(failing, name="fresh", run_id=run_id, tags={})
    assert [m.name for m in client.search_registered_models()] == []


def test_champion_moves_with_history_and_rollback(client: MlflowClient, settings: Settings) -> None:
    for _ in range(3):
        register(client, settings)
    set_champion(client, "viggo", "1", reason="first version beats base")
    set_champion(client, "viggo", 2, reason="gate passed")
    set_champion(client, "viggo", "3", reason="gate passed again")
    set_champion(client, "viggo", "3", reason="repeat is a no-op")
    assert champion_history(client, "viggo") == ["1", "2", "3"]
    champion = get_champion(client, "viggo")
    assert champion is not None and str(champion.version) == "3"
    assert champion.tags["promotion_reason"] == "gate passed again" and "promoted_at" in champion.tags

    assert rollback(client, "viggo") == ("3", "2")
    assert str(get_champion(client, "viggo").version) == "2"
    assert client.get_model_version("viggo", "2").tags["promotion_reason"] == "rollback from v3"
    assert "rolled_back_at" in client.get_model_version("viggo", "3").tags
    assert rollback(client, "viggo") == ("2", "1")
    with pytest.raises(NoPreviousChampion, match="no earlier champion"):
        rollback(client, "viggo")
    assert str(get_champion(client, "viggo").version) == "1"


def test_rollback_needs_a_champion(client: MlflowClient, settings: Settings) -> None:
    register(client, settings)
    with pytest.raises(NoPreviousChampion, match="has no champion"):
        rollback(client, "viggo")
    with pytest.raises(AdapterNotFound, match="no registered adapter named 'nope'"):
        rollback(client, "nope")


def test_rollback_survives_hand_moved_alias_and_deleted_versions(client: MlflowClient,
                                                                 settings: Settings) -> None:
    for _ in range(4):
        register(client, settings)
    set_champion(client, "viggo", "1", reason="a")
    set_champion(client, "viggo", "2", reason="b")
    set_champion(client, "viggo", "3", reason="c")
    client.delete_model_version("viggo", "2")
    client.set_registered_model_alias("viggo", CHAMPION, "4")  # moved in the MLflow UI
    assert rollback(client, "viggo") == ("4", "3")
    assert rollback(client, "viggo") == ("3", "1")  # v2 is gone


def test_set_champion_and_promote_validate_the_version(client: MlflowClient, settings: Settings) -> None:
    register(client, settings)
    register(client, settings)
    with pytest.raises(AdapterNotFound, match="has no version 9"):
        promote(client, "viggo", "9", "manual")
    with pytest.raises(AdapterNotFound, match="no registered adapter named 'nope'"):
        set_champion(client, "nope", "1", reason="x")
    with pytest.raises(ValueError, match="needs a reason"):
        set_champion(client, "viggo", "1", reason=" ")
    promoted = promote(client, "viggo", "challenger", "manual: looks good")
    assert str(promoted.version) == "2" and promoted.tags["promotion_reason"] == "manual: looks good"
    assert str(get_champion(client, "viggo").version) == "2"


def test_get_version_resolves_numbers_aliases_and_latest(client: MlflowClient, settings: Settings) -> None:
    register(client, settings)
    register(client, settings)
    set_champion(client, "viggo", "1", reason="x")
    assert str(get_version(client, "viggo", 1).version) == "1"
    assert str(get_version(client, "viggo", "champion").version) == "1"
    assert str(get_version(client, "viggo", "challenger").version) == "2"
    assert str(get_version(client, "viggo", "latest").version) == "2"
    with pytest.raises(AdapterNotFound, match=r"no alias 'staging' \(aliases: challenger=v2, champion=v1\)"):
        get_version(client, "viggo", "staging")
    with pytest.raises(AdapterNotFound, match="no registered adapter named 'other'"):
        get_version(client, "other", "1")
    assert get_champion(client, "other") is None
    assert latest_version(client, "other") is None
    assert str(latest_version(client, "viggo").version) == "2"


def test_version_metrics_read_tag_prefixes(client: MlflowClient, settings: Settings) -> None:
    run_id = logged_run(client, settings, "viggo", f1=0.6)
    version = register_adapter(client, name="viggo", run_id=run_id,
                               tags={"base_metric.field_f1": "0.25", "metric.broken": "n/a"})
    assert version_metrics(version) == {"field_f1": 0.6}  # the non-number is skipped with a warning
    assert version_metrics(version, prefix="base_metric.") == {"field_f1": 0.25}


def test_metrics_survive_the_tag_round_trip_exactly(client: MlflowClient, settings: Settings) -> None:
    """The gate compares a challenger's in-memory metrics with the champion's read back from tags:
    any rounding on the way (e.g. `:.6g`) would make an equal challenger fall short."""
    awkward = {"field_f1": 119 / 120, "exact_match": 1 / 3, "rouge_l": 0.1 + 0.2}
    run_id = logged_run(client, settings, "viggo", f1=awkward["field_f1"])
    version = register_adapter(client, name="viggo", run_id=run_id,
                               tags=metric_tags(awkward, prefix="base_metric."))
    assert version_metrics(version)["field_f1"] == awkward["field_f1"]
    assert version_metrics(version, prefix="base_metric.") == awkward


def test_list_adapters(client: MlflowClient, settings: Settings) -> None:
    register(client, settings, "viggo", f1=0.4)
    register(client, settings, "viggo", f1=0.6)
    register(client, settings, "conll", f1=0.8)
    set_champion(client, "viggo", "1", reason="x")
    client.create_registered_model("not-lorafleet")  # someone else's model in a shared registry

    summaries = list_adapters(client)
    assert [s.name for s in summaries] == ["conll", "viggo"]
    conll, viggo = summaries
    assert (conll.latest_version, conll.champion, conll.challenger) == ("1", None, "1")
    assert conll.metrics == {"field_f1": 0.8}
    assert (viggo.latest_version, viggo.champion, viggo.challenger) == ("2", "1", "2")
    assert viggo.metrics == {"field_f1": 0.4}  # the champion's numbers head the row
    assert viggo.base_model == "tiny-random-llama" and viggo.method == "lora"
    assert [(v.version, v.aliases, v.metrics["field_f1"]) for v in viggo.versions] == [
        ("2", ("challenger",), 0.6), ("1", ("champion",), 0.4)]
    as_json = json.loads(json.dumps([summary.as_dict() for summary in summaries]))
    assert as_json[1]["versions"][1]["aliases"] == ["champion"] and as_json[1]["champion"] == "1"


def test_models_uris_download_the_adapter_folder(client: MlflowClient, settings: Settings,
                                                 tmp_path: Path) -> None:
    register(client, settings, weights="one")
    register(client, settings, weights="two")
    set_champion(client, "viggo", "1", reason="x")
    for uri, weights in (("models:/viggo@champion", "one"), ("models:/viggo/2", "two"),
                         ("models:/viggo@challenger", "two")):
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / uri.replace("/", "_"))))
        assert sorted(p.name for p in local.iterdir()) == ["adapter_model.safetensors", "lorafleet.json"]
        assert (local / "adapter_model.safetensors").read_text() == weights
        assert json.loads((local / "lorafleet.json").read_text())["name"] == "viggo"


def test_download_adapter_resolves_alias_and_reuses_folder(client: MlflowClient, settings: Settings) -> None:
    register(client, settings, weights="one")
    register(client, settings, weights="two")
    set_champion(client, "viggo", "1", reason="x")
    root = settings.adapter_download_dir

    path = download_adapter(client, "viggo", "champion", root)
    assert path == root / "viggo" / "v1"
    assert (path / "adapter_model.safetensors").read_text() == "one"
    (path / "marker").write_text("kept")
    assert download_adapter(client, "viggo", 1, root) == path
    assert (path / "marker").exists()  # reused, not downloaded again

    set_champion(client, "viggo", "2", reason="y")
    moved = download_adapter(client, "viggo", "champion", root)
    assert moved == root / "viggo" / "v2" and (moved / "adapter_model.safetensors").read_text() == "two"
    assert sorted(p.name for p in (root / "viggo").iterdir() if not p.name.startswith(".")) == ["v1", "v2"]
    assert not [p for p in (root / "viggo").iterdir() if p.name.endswith(".partial")]
    with pytest.raises(AdapterNotFound):
        download_adapter(client, "viggo", "7", root)
    assert not (root / "viggo" / "v7").exists()


@pytest.mark.parametrize("name,ref", [("..", "1"), ("a/b", "1"), ("x" * 300, "1"), ("alpha", "9" * 5000),
                                      ("alpha", "99999999999999999999"), ("alpha", "../1"), ("alpha\n", "1")])
def test_get_version_refuses_names_and_references_no_adapter_can_have(tmp_path, name, ref):
    """`..`, a 300-character name or a 5,000-digit version is AdapterNotFound before the store is asked,
    never a raw store error, and `download_adapter` writes nothing for it."""
    from lorafleet.tasks.registry import AdapterNotFound, download_adapter, get_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    with pytest.raises(AdapterNotFound):
        get_version(client, name, ref)
    with pytest.raises(AdapterNotFound):
        download_adapter(client, name, ref, tmp_path / "downloads")
    assert not (tmp_path / "downloads").exists()
