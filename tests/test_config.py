"""Config loading: every shipped config is valid; bad configs fail naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.config import ConfigError, load_config, load_retrain_config, parse_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    if path.name.startswith("retrain"):
        specs = load_retrain_config(path).adapters
        assert len({spec.name for spec in specs}) == len(specs) >= 2
    else:
        assert load_config(path).name


@pytest.mark.parametrize("raw, message", [
    ({"data": {"preset": "viggo"}}, r"c\.yaml: name: Field required"),
    ({"name": "Bad Name", "data": {"preset": "viggo"}}, r"c\.yaml: name: .*lowercase"),
    ({"name": "x@1", "data": {"preset": "viggo"}}, r"c\.yaml: name: .*'@'"),
    ({"name": "x", "data": {}}, r"c\.yaml: data: .*preset.*train_file"),
    ({"name": "x", "data": {"preset": "nope"}}, r"c\.yaml: data.*unknown data preset 'nope'"),
    ({"name": "x", "data": {"preset": "viggo"}, "training": {"batch_size": 0}},
     r"c\.yaml: training\.batch_size: .*greater than or equal to 1"),
    ({"name": "x", "data": {"preset": "viggo"}, "training": {"lr": 0.1}}, r"c\.yaml: training\.lr: unknown field"),
    ({"name": "x", "data": {"preset": "viggo"}, "method": "dora"}, r"c\.yaml: method: .*'lora', 'qlora', 'adalora', 'turbo_lora', 'turbo' or 'merge'"),
    ({"name": "x", "data": {"preset": "viggo"}, "lora": {"r": 0}}, r"c\.yaml: lora\.r: "),
    ({"name": "x", "data": {"preset": "viggo", "prompt_template": "no slot"}}, r"c\.yaml: data.*\{prompt\}"),
])
def test_bad_fields_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, source="c.yaml")


def test_relative_data_files_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "a.yaml"
    config.write_text("name: a\ndata:\n  train_file: data/train.jsonl\n")
    assert load_config(config).data.train_file == str(tmp_path / "sub" / "data" / "train.jsonl")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_retrain_config_rejects_duplicates_and_names_inline_entries(tmp_path):
    path = tmp_path / "retrain.yaml"
    path.write_text("adapters:\n  - {name: a, data: {preset: viggo}}\n  - {name: a, data: {preset: viggo}}\n")
    with pytest.raises(ConfigError, match="repeated: \\['a'\\]"):
        load_retrain_config(path)
    path.write_text("adapters:\n  - {name: a, data: {preset: viggo}, training: {epochs: -1}}\n")
    with pytest.raises(ConfigError, match=r"adapters\.0: training\.epochs"):
        load_retrain_config(path)


def test_the_data_section_knows_exactly_the_presets_tasks_define():
    """`lorafleet/sections/data.py` validates preset names at config load without importing tasks/."""
    from lorafleet.sections.data import PRESET_NAMES
    from lorafleet.tasks.data.presets import PRESETS

    assert set(PRESET_NAMES) == set(PRESETS)
    with pytest.raises(ConfigError, match="unknown data preset 'nope'; known presets: extraction, viggo"):
        parse_config({"name": "x", "data": {"preset": "nope"}})
