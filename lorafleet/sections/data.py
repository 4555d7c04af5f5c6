"""Config section `data`: where examples come from and how they become chat prompts.

Owned by `lorafleet/` (not `tasks/data/`, which applies it) so that `lorafleet/config.py` depends on
models/ and lorafleet/ only. The presets themselves (files, columns, prompts) live in
`tasks/data/presets.py`; their names are listed here so a config naming an unknown one fails at load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorafleet.models.adapter_dir import OutputFormat

# The presets `tasks/data/presets.py` defines (a test keeps the two lists equal).
PRESET_NAMES = ("extraction", "viggo")


class ColumnMapping(BaseModel):
    """Which columns of a file hold the input. Either `prompt` + `completion`, or `messages`
    (a list of {role, content} whose last item is the assistant's answer)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str | None = "prompt"
    completion: str | None = "completion"
    messages: str | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> ColumnMapping:
        if self.messages is None and (self.prompt is None or self.completion is None):
            raise ValueError("columns: give both `prompt` and `completion`, or `messages`")
        return self


class DataSettings(BaseModel):
    """Where the data comes from (a preset or files) and how prompts are built.

    A preset (`extraction`: the built-in generated task; `viggo`: ViGGO text -> meaning representation
    read from `<data_root>/viggo`) supplies files, columns, template, system prompt and output
    format; any field set explicitly in the config wins over the preset (see `presets.py`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    format: Literal["auto", "csv", "jsonl", "parquet"] = "auto"
    columns: ColumnMapping | None = None
    prompt_template: str | None = Field(None, description="user message; `{prompt}` is replaced by the input")
    system_prompt: str | None = None
    output_format: OutputFormat | None = None
    max_length: int = Field(512, ge=16, description="prompt + completion tokens; longer examples are dropped")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="used when no validation_file is given")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="used when no test_file is given")
    limit_train: int | None = Field(None, ge=1)
    limit_validation: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    generated_size: int = Field(4000, ge=30, description="number of examples of the generated task")
    seed: int = 0

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESET_NAMES:
            raise ValueError(f"unknown data preset {value!r}; known presets: {', '.join(sorted(PRESET_NAMES))}")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, value: str | None) -> str | None:
        if value is not None and "{prompt}" not in value:
            raise ValueError("must contain {prompt}, where the input goes (other braces are kept as they are)")
        return value

    @model_validator(mode="after")
    def _has_source(self) -> DataSettings:
        if self.preset is None and self.train_file is None:
            raise ValueError("data: set `preset` or `train_file`")
        return self
