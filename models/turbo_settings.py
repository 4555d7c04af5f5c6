"""Config section `turbo`: the speculative heads of `turbo_lora` and `turbo` adapters."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TurboSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_heads: int = Field(4, ge=1, le=8, description="K: head k predicts the token k+1 positions ahead")
    block_size: int | None = Field(None, ge=1, description="inner width of each head's residual block "
                                                           "(default: the model's hidden size)")
    loss_weight: float = Field(0.2, gt=0, description="turbo_lora: weight of head 1's loss next to the LM loss")
    decay: float = Field(0.8, gt=0, le=1, description="head k's loss weight is loss_weight · decay^(k-1)")
    head_learning_rate: float = Field(1e-3, gt=0)
    base_adapter: str | None = Field(None, description="turbo: the LoRA adapter to put heads on (a folder or "
                                                        "models:/NAME@ALIAS, models:/NAME/VERSION); none = bare base")
    distill_examples: int | None = Field(2000, ge=1, description="turbo: training prompts continued greedily by "
                                                                 "the model itself (self-distillation targets)")
    distill_max_new_tokens: int = Field(128, ge=1)

    def head_weights(self) -> list[float]:
        return [self.loss_weight * self.decay ** k for k in range(self.num_heads)]
