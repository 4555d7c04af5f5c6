"""Config section `merge`: the parents and recipe of a `method: merge` adapter (`lorafleet merge`).

A merged adapter is produced instead of trained, then evaluated, registered and gated like any other
(the `finetune` flow's stages), so the section only says which adapters and how; `data`, `evaluation`
and `promotion` keep their usual meaning (the rows the merge is judged on).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorafleet.models.merging import MAX_MERGED, MergeMethod, MergeRecipe, SignMethod


class MergeParent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    adapter: str = Field(min_length=1, description="an adapter folder, a models:/ URI or a registered "
                                                   "NAME[@ALIAS|@VERSION] (pinned to its version when merged)")
    weight: float = Field(1.0, allow_inf_nan=False)

    @classmethod
    def parse(cls, text: str) -> MergeParent:
        """`REF:WEIGHT` (the command line's spelling; `REF` alone weighs 1). The weight is after the last
        colon, so `models:/viggo/3:0.5` works."""
        reference, sep, weight = text.rpartition(":")
        if not sep or "/" in weight:  # no weight given (`viggo`, `models:/viggo/3`)
            return cls(adapter=text)
        try:
            return cls(adapter=reference, weight=float(weight))
        except ValueError:
            raise ValueError(f"{text!r}: the weight after ':' must be a number, e.g. viggo:0.7") from None


class MergeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    adapters: list[MergeParent] = Field(min_length=1, max_length=MAX_MERGED)
    method: MergeMethod = Field("linear", description="PEFT add_weighted_adapter's combination_type")
    density: float | None = Field(None, gt=0, le=1, description="fraction of values kept (ties, dare_*)")
    majority_sign_method: SignMethod = "total"
    seed: int = Field(0, ge=0, lt=2**63, description="seeds DARE's random drops")

    @field_validator("adapters")
    @classmethod
    def _distinct(cls, value: list[MergeParent]) -> list[MergeParent]:
        names = [parent.adapter for parent in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"each adapter may appear once, repeated: {repeated} (add the weights instead)")
        return value

    @model_validator(mode="after")
    def _valid_recipe(self) -> MergeSettings:
        self.recipe()  # MergeRecipe's checks (density per method, non-zero weights) at config load
        return self

    def recipe(self) -> MergeRecipe:
        return MergeRecipe(weights=tuple(parent.weight for parent in self.adapters), method=self.method,
                           density=self.density, majority_sign_method=self.majority_sign_method, seed=self.seed)
