"""Fixture builders for the serving tests: tiny LoRA adapters registered in a real MLflow store.

Adapters get random non-zero LoRA B matrices (PEFT initialises B to zero, which would make an
adapter's output identical to the base model's and hide routing bugs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BASE = "tiny-random-llama"
# ServiceSettings fields for an in-process app under FastAPI's TestClient: as if bound to loopback (so the
# admin endpoints are on without a key, see serving/api/auth.py), answering the test client's `Host: testserver`.
IN_PROCESS = {"bind_host": "127.0.0.1", "allowed_hosts": ("testserver",)}


def make_adapter(
    model_cache: Path,
    target: Path,
    *,
    name: str,
    seed: int,
    base_model: str = BASE,
    system_prompt: str | None = None,
) -> Path:
    """Write a tiny LoRA adapter directory (with manifest) trained on nothing but distinct from the base."""
    import torch

    from lorafleet.models.adapter_dir import AdapterManifest, BaseModelRef, TaskInfo
    from lorafleet.models.base import load_base_model, tokenizer_fingerprint
    from lorafleet.models.lora import LoraSettings, apply_lora, save_adapter

    loaded = load_base_model(BASE, model_cache)
    peft_model = apply_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    # Both A and B from a private generator: PEFT draws A from the global RNG, which would make the
    # adapter (and so every expected output) depend on which tests ran before.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_A" in param_name or "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    revision = loaded.resolved.revision if base_model == BASE else "other-revision"
    manifest = AdapterManifest(
        name=name,
        method="lora",
        base_model=BaseModelRef(id=base_model, revision=revision),
        tokenizer_hash=tokenizer_fingerprint(loaded.tokenizer),
        chat_template=loaded.tokenizer.chat_template,
        task=TaskInfo(name=name, system_prompt=system_prompt),
    )
    return save_adapter(peft_model, target, manifest)


def register_adapter(
    client: Any, adapter_dir: Path, *, name: str, artifact_root: Path, champion: bool = True
) -> int:
    """Log `adapter_dir` as a run's `adapter` artifact and register it the way the pipeline does
    (`lorafleet.tasks.registry`: alias `challenger`), then optionally make it champion."""
    from lorafleet.tasks.registry import register_adapter as register
    from lorafleet.tasks.registry import set_champion

    experiment_name = f"lorafleet/{name}"
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(experiment_name, artifact_location=(artifact_root / name).as_uri())
    )
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(adapter_dir), "adapter")
    client.set_terminated(run.info.run_id)
    version = register(client, name=name, run_id=run.info.run_id, tags={})
    if champion:
        set_champion(client, name, version.version, reason="serving test fixture")
    return int(version.version)


def reference_greedy(
    model_cache: Path, adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int
) -> list[int]:
    """Plain greedy `generate` of the base model with at most one adapter: the oracle for the server."""
    import torch
    from peft import PeftModel

    from lorafleet.models.base import load_base_model

    loaded = load_base_model(BASE, model_cache)
    model = loaded.model if adapter_dir is None else PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    model.eval()
    with torch.inference_mode():
        output = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    generated = output[0, len(prompt_ids) :].tolist()
    eos = loaded.tokenizer.eos_token_id
    return generated[: generated.index(eos)] if eos in generated else generated


def add_heads(adapter_dir: Path, model_cache: Path, *, seed: int, num_heads: int = 3,
              heads_only_target: Path | None = None) -> Path:
    """Give a test adapter random Turbo heads (method turbo_lora), or write heads alone, without the
    LoRA, to `heads_only_target` (method turbo on the bare base)."""
    import torch

    from lorafleet.models.adapter_dir import read_manifest, write_manifest
    from lorafleet.models.base import load_base_model
    from lorafleet.models.turbo_heads import new_heads, save_heads

    heads = new_heads(load_base_model(BASE, model_cache).model, num_heads=num_heads)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    manifest = read_manifest(adapter_dir)
    if heads_only_target is None:
        save_heads(heads, adapter_dir)
        write_manifest(adapter_dir, manifest.model_copy(update={"method": "turbo_lora"}))
        return adapter_dir
    heads_only_target.mkdir(parents=True)
    save_heads(heads, heads_only_target)
    write_manifest(heads_only_target, manifest.model_copy(update={"method": "turbo", "name": heads_only_target.name}))
    return heads_only_target
