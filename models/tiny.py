"""A tiny random Llama with a byte-level tokenizer, for tests and the smoke pipeline.

It needs no download and no wheel: the tokenizer is 256 byte tokens plus SmolLM2's three chat
special tokens (same ids, same chat template), so every code path that handles SmolLM2 (chat
formatting, label masking, stop tokens, PEFT targets) is exercised by the tiny model too.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cache import atomic_directory, file_lock, sha256_file

TINY_MODEL_ID = "tiny-random-llama"
_REVISION_FILE = "lorafleet_revision.json"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# SmolLM2's template with a shorter default system line (bytes are expensive for the tiny model).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_byte_tokenizer():
    """A fast tokenizer over raw UTF-8 bytes with SmolLM2's special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    # alphabet() comes from a hash set: sort it so every build gets the same ids.
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def tiny_llama_config(vocab_size: int = 320, **overrides):
    from transformers import LlamaConfig

    fields = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        # 5x the usual 0.02: with frozen random tied embeddings, a 0.02 init caps logits near ±1 and
        # no adapter can make the output distribution peaked; at 0.1 a LoRA learns a task in seconds.
        "initializer_range": 0.1,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_model_dir(cache_dir: Path, seed: int = 0) -> Path:
    """Build (once) and return the cached folder of the tiny random Llama for `seed`.

    Cached on disk rather than rebuilt in memory so that every process (trainer, evaluator,
    server) loads exactly the same random weights.
    """
    name = TINY_MODEL_ID if seed == 0 else f"{TINY_MODEL_ID}-seed{seed}"
    target = Path(cache_dir) / name
    if (target / _REVISION_FILE).exists():
        return target
    with file_lock(Path(cache_dir) / f".{name}.lock"):
        if not (target / _REVISION_FILE).exists():
            _build(target, seed)
    return target


def tiny_revision(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / _REVISION_FILE).read_text())["revision"]


def _build(target: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with atomic_directory(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        revision = {"seed": seed, "revision": sha256_file(staging / "model.safetensors")[:16]}
        (staging / _REVISION_FILE).write_text(json.dumps(revision, indent=2))
