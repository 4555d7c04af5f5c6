"""models/grammar.py: constrained JSON decoding with llguidance, on the tiny byte tokenizer (whose
logits are wider than its vocabulary) and, marked slow, on SmolLM2's 49,152-token tokenizer.

Invariants: greedy decoding of random logits under the mask always ends in valid JSON that satisfies the
schema; a rejected token changes nothing; rollback restores the exact mask; draft checks count what the
grammar accepts; constrained speculative greedy == constrained plain greedy; invalid formats raise
InvalidGrammar naming the field.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.models.grammar import GrammarCompiler, GrammarSettings, InvalidGrammar, apply_masks
from lorafleet.models.sampling_rules import eos_token_ids

TINY_WIDTH = 333  # the tiny model's logits are 320 wide; 333 also leaves a partly used last mask word

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": ["integer", "null"], "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}


def schema_format(schema, name="person", **extra):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, **extra}}


JSON_OBJECT = {"type": "json_object"}


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return GrammarCompiler(tiny_tokenizer, TINY_WIDTH, eos_token_ids(None, tiny_tokenizer))


@pytest.fixture(scope="module")
def smollm2_tokenizer(model_cache):
    from lorafleet.models.base import load_tokenizer, resolve_base_model

    return load_tokenizer(resolve_base_model("smollm2-135m-instruct", model_cache))


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    return GrammarCompiler(smollm2_tokenizer, 49152, eos_token_ids(None, smollm2_tokenizer))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def allowed(bitmask, row=0):
    """The set bits of one bitmask row, as token ids."""
    words = bitmask[row].tolist()
    return {32 * w + b for w, word in enumerate(words) for b in range(32) if (word >> b) & 1}


def mask_of(matcher, compiler):
    bitmask = compiler.allocate_bitmask(1)
    matcher.fill_mask(bitmask, 0)
    return bitmask


def check_schema(value, schema):
    try:
        import jsonschema
    except ImportError:  # the fields by hand
        assert set(value) == set(schema["required"]) and isinstance(value["name"], str)
        assert value["age"] is None or 0 <= value["age"] <= 150
        assert isinstance(value["address"]["city"], str) and len(value["tags"]) <= 3
        return
    jsonschema.validate(value, schema)


_BIASES: dict = {}


def closing_bias(tokenizer, width):
    """1 for tokens that close something (a quote, brace, bracket) and for EOS: added with a weight that
    grows per step, random greedy decoding then always ends."""
    if (id(tokenizer), width) in _BIASES:
        return _BIASES[id(tokenizer), width]
    bias = _BIASES[id(tokenizer), width] = torch.zeros(width)
    for token, text in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if any(c in text for c in '"}]'):
            bias[token] = 1.0
    bias[list(eos_token_ids(None, tokenizer))] = 1.0
    return bias


def random_greedy(compiler, tokenizer, response_format, seed, max_steps=400):
    """Greedy decoding of random logits under the mask: (generated ids without EOS, whether EOS was taken)."""
    matcher = compiler.compile(response_format).matcher()
    bias = closing_bias(tokenizer, compiler.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    bitmask = compiler.allocate_bitmask(1)
    tokens = []
    for step in range(max_steps):
        logits = torch.randn(1, compiler.vocab_size, generator=generator) + bias * step / 25  # (1, V)
        matcher.fill_mask(bitmask, 0)
        token = int(apply_masks(logits, bitmask).argmax())
        assert matcher.accept(token), f"the mask allowed {token} but accept refused it"
        if token in compiler.eos_token_ids:
            return tokens, True
        tokens.append(token)
    return tokens, False


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fmt", ["json_object", "schema"])
def test_random_greedy_decoding_gives_valid_json_on_the_tiny_tokenizer(tiny, tiny_tokenizer, fmt, seed):
    response_format = JSON_OBJECT if fmt == "json_object" else schema_format(PERSON)
    tokens, ended = random_greedy(tiny, tiny_tokenizer, response_format, seed)
    assert ended
    value = json.loads(tiny_tokenizer.decode(tokens))
    assert isinstance(value, dict)
    if fmt == "schema":
        check_schema(value, PERSON)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fmt", ["json_object", "schema"])
def test_random_greedy_decoding_gives_valid_json_on_smollm2(smollm2, smollm2_tokenizer, fmt, seed):
    response_format = JSON_OBJECT if fmt == "json_object" else schema_format(PERSON)
    tokens, ended = random_greedy(smollm2, smollm2_tokenizer, response_format, seed)
    assert ended
    value = json.loads(smollm2_tokenizer.decode(tokens))
    assert isinstance(value, dict)
    if fmt == "schema":
        check_schema(value, PERSON)


def test_the_mask_forbids_an_invalid_next_token_and_accept_refuses_it(tiny, tiny_tokenizer):
    matcher = tiny.compile(schema_format(PERSON)).matcher()
    for token in ids(tiny_tokenizer, '{"name":"Al","age":'):
        assert matcher.accept(token)
    before = mask_of(matcher, tiny)
    letter, digit = ids(tiny_tokenizer, "x")[0], ids(tiny_tokenizer, "7")[0]
    assert letter not in allowed(before) and digit in allowed(before)
    assert not matcher.accept(letter)
    assert torch.equal(mask_of(matcher, tiny), before) and matcher.num_accepted == len(ids(tiny_tokenizer,
                                                                                             '{"name":"Al","age":'))
    assert matcher.accept(digit)  # a refused token leaves the matcher usable


def test_special_tokens_are_never_allowed_even_inside_a_string(tiny, tiny_tokenizer):
    """`<|im_start|>` is text to a careless grammar; here only EOS is ever allowed of the special tokens."""
    matcher = tiny.compile(schema_format(PERSON)).matcher()
    for token in ids(tiny_tokenizer, '{"name":"'):
        assert matcher.accept(token)
    assert not {0, 1, 2} & allowed(mask_of(matcher, tiny))


def test_rollback_restores_the_mask_step_by_step(tiny, tiny_tokenizer):
    matcher = tiny.compile(schema_format(PERSON)).matcher()
    text = '{"name":"Al","age":7,"tags":["a"],"address":{"city":"Oslo"}}'
    stream = ids(tiny_tokenizer, text) + [2]
    masks = []
    for token in stream:
        masks.append(mask_of(matcher, tiny))
        assert matcher.accept(token)
    assert matcher.eos_accepted and matcher.is_terminated()
    for n in (1, 3, 10, len(stream)):  # from the end: over the EOS first, then back to the start
        matcher.rollback(n - (len(stream) - matcher.num_accepted))
        assert matcher.num_accepted == len(stream) - n
        assert torch.equal(mask_of(matcher, tiny), masks[len(stream) - n]), n
    with pytest.raises(ValueError, match="only 0 tokens"):
        matcher.rollback(1)
    for token in stream:  # and it replays to the same end
        assert matcher.accept(token)
    assert matcher.eos_accepted


def test_eos_is_the_only_choice_once_the_object_is_complete(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer, TINY_WIDTH, [2, 0])  # two stop ids, as SmolLM2's configs can have
    matcher = compiler.compile(JSON_OBJECT).matcher()
    assert not matcher.can_stop() and not matcher.accept(2)  # nothing written yet: EOS is refused
    for token in ids(tiny_tokenizer, '{"a": [1, {"b": null}]}'):
        assert matcher.accept(token)
    assert matcher.can_stop() and matcher.is_terminated()
    assert allowed(mask_of(matcher, compiler)) == {0, 2}
    assert matcher.accept(0) and matcher.eos_accepted
    assert not matcher.accept(2) and not matcher.accept(ids(tiny_tokenizer, " ")[0])
    assert allowed(mask_of(matcher, compiler)) == {0, 2}


def test_json_object_takes_any_object_and_nothing_else(tiny, tiny_tokenizer):
    matcher = tiny.compile(JSON_OBJECT).matcher()
    assert matcher.accepts_prefix(ids(tiny_tokenizer, "[1]")) == 0
    assert matcher.accepts_prefix(ids(tiny_tokenizer, '"text"')) == 0
    nested = ids(tiny_tokenizer, '{"x": [1, 2.5, {"y": null, "z": true}], "w": "é"}') + [2]
    assert matcher.accepts_prefix(nested) == len(nested)


def test_accepts_prefix_counts_up_to_an_invalid_draft_token_and_changes_nothing(tiny, tiny_tokenizer):
    matcher = tiny.compile(schema_format(PERSON)).matcher()
    for token in ids(tiny_tokenizer, '{"name":"Al",'):
        assert matcher.accept(token)
    before, accepted = mask_of(matcher, tiny), matcher.num_accepted
    good = ids(tiny_tokenizer, '"age":12')
    assert matcher.accepts_prefix(good + ids(tiny_tokenizer, "x") + good) == len(good)  # 'x' after a number
    assert matcher.accepts_prefix([]) == 0
    assert matcher.accepts_prefix(ids(tiny_tokenizer, '"tags"')) == 1  # the quote: properties come in order
    # EOS in a draft counts only where the JSON is complete, and nothing after it counts
    assert matcher.accepts_prefix(good + [2]) == len(good)
    rest = ids(tiny_tokenizer, '"age":1,"tags":[],"address":{"city":""}}')
    assert matcher.accepts_prefix(rest + [2] + good) == len(rest) + 1
    assert torch.equal(mask_of(matcher, tiny), before) and matcher.num_accepted == accepted


def test_fill_draft_masks_writes_the_masks_of_stepping_through_the_draft(tiny, tiny_tokenizer):
    matcher = tiny.compile(schema_format(PERSON)).matcher()
    for token in ids(tiny_tokenizer, '{"name":"'):
        assert matcher.accept(token)
    draft = ids(tiny_tokenizer, 'Bo","a') + ids(tiny_tokenizer, "q") + ids(tiny_tokenizer, "ge")
    bitmask = tiny.allocate_bitmask(len(draft) + 2)
    bitmask[-1] = 12345  # rows past the accepted prefix are not written
    n = matcher.fill_draft_masks(draft, bitmask, 1)
    assert n == len(ids(tiny_tokenizer, 'Bo","a'))
    assert matcher.num_accepted == len(ids(tiny_tokenizer, '{"name":"'))
    for i in range(n + 1):
        assert torch.equal(bitmask[1 + i], mask_of(matcher, tiny)[0]), i
        if i < n:
            assert matcher.accept(draft[i])
    assert bool((bitmask[-1] == 12345).all())


def target_logits(prefix, width, bias):
    """A deterministic stand-in for the target model: logits from the prefix alone."""
    generator = torch.Generator().manual_seed(hash(tuple(prefix)) % (2**31))
    return torch.randn(width, generator=generator) + bias * len(prefix) / 25  # (V,)


@pytest.mark.parametrize("seed", range(4))
def test_constrained_speculative_greedy_equals_constrained_plain_greedy(tiny, tiny_tokenizer, seed):
    """Drafts (half right, half random) verified against masked target logits give exactly the tokens
    that masked plain greedy gives: verification honours the mask at every draft position."""
    grammar = tiny.compile(schema_format(PERSON))
    bias = closing_bias(tiny_tokenizer, tiny.vocab_size)
    eos = set(tiny.eos_token_ids)

    def greedy(matcher, prefix, bitmask, row):
        logits = target_logits(prefix, tiny.vocab_size, bias).unsqueeze(0)  # (1, V)
        return int(apply_masks(logits, bitmask[row:row + 1]).argmax())

    plain, matcher, bitmask = [], grammar.matcher(), tiny.allocate_bitmask(1)
    while not plain or plain[-1] not in eos:
        matcher.fill_mask(bitmask, 0)
        plain.append(greedy(matcher, plain, bitmask, 0))
        assert matcher.accept(plain[-1]) and len(plain) < 400

    rng = torch.Generator().manual_seed(seed)
    speculative, matcher, k = [], grammar.matcher(), 4
    bitmask = tiny.allocate_bitmask(k + 1)
    while not speculative or speculative[-1] not in eos:
        # a draft of k tokens: the true continuation where a coin says so, a random token elsewhere
        truth = plain[len(speculative):len(speculative) + k]
        draft = [t if torch.rand(1, generator=rng) < 0.5 else int(torch.randint(tiny.vocab_size, (1,),
                                                                                  generator=rng)) for t in truth]
        n = matcher.fill_draft_masks(draft, bitmask, 0)
        accepted = []
        for i in range(n + 1):
            token = greedy(matcher, speculative + accepted, bitmask, i)
            accepted.append(token)
            if i == n or token != draft[i] or token in eos:
                break
        for token in accepted:
            assert matcher.accept(token)
        speculative += accepted
        assert len(speculative) < 400
    assert speculative == plain


@pytest.mark.parametrize(("response_format", "message"), [
    ("json", "response_format: expected an object"),
    ({"type": "text"}, "response_format.type: expected 'json_object' or 'json_schema'"),
    ({"type": "json_object", "schema": {}}, "response_format: unknown field 'schema'"),
    ({"type": "json_schema"}, "response_format.json_schema: required"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "json_schema.name: required"),
    (schema_format(PERSON, name="has space"), "json_schema.name"),
    (schema_format(PERSON, strict="yes"), "json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema: required"),
    (schema_format([1, 2]), "json_schema.schema: required, a JSON Schema object (got list)"),
    (schema_format({"type": "objekt"}), "json_schema.schema: Invalid type: objekt"),
    (schema_format({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), "not"),
    (schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "$defs/missing"),
    (schema_format({"type": "string", "pattern": "(unclosed"}), "json_schema.schema: regex"),
    (schema_format({"type": "string", "format": "nonsense"}), "nonsense"),
    (schema_format({"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                    "required": ["a"]}), "nsatisfiable"),
    (schema_format({"type": "number", "minimum": float("nan")}), "json_schema.schema: not JSON"),
])
def test_invalid_formats_raise_invalid_grammar_naming_the_field(tiny, response_format, message):
    with pytest.raises(InvalidGrammar, match=None) as raised:
        tiny.compile(response_format)
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_huge_or_deep_schemas_are_refused_without_echoing_them(tiny):
    huge = {"type": "string", "enum": ["x" * 100_000]}
    with pytest.raises(InvalidGrammar, match=r"json_schema.schema: \d+ bytes, over the limit of 32768") as raised:
        tiny.compile(schema_format(huge))
    assert len(str(raised.value)) < 200
    deep: dict = {"type": "string"}
    for _ in range(5000):  # deeper than the recursion limit
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidGrammar, match="json_schema.schema: nested deeper than 32 levels"):
        tiny.compile(schema_format(deep))
    long_name = {"type": "object", "properties": {"a": {"type": "x" * 5000}}}
    with pytest.raises(InvalidGrammar) as raised:
        tiny.compile(schema_format(long_name))
    assert len(str(raised.value)) < 400


def test_ids_past_the_tokenizer_are_always_masked_off(tiny, tiny_tokenizer):
    assert len(tiny_tokenizer) < 320 < TINY_WIDTH
    extra = set(range(len(tiny_tokenizer), TINY_WIDTH))
    matcher = tiny.compile(JSON_OBJECT).matcher()
    for token in ids(tiny_tokenizer, '{"k": "v"}') + [2]:
        mask = mask_of(matcher, tiny)
        assert not extra & allowed(mask)
        assert not (allowed(mask) - set(range(TINY_WIDTH)))  # no bit past the width either
        logits = apply_masks(torch.zeros(1, TINY_WIDTH), mask)
        assert bool(torch.isinf(logits[0, sorted(extra)]).all())
        assert matcher.accept(token)


def test_cache_returns_one_grammar_for_schemas_that_differ_only_in_keyword_order(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer, TINY_WIDTH, [2], GrammarSettings(cache_size=2))
    reordered = {"additionalProperties": False, "required": PERSON["required"],
                 "properties": {k: dict(reversed(list(v.items()))) for k, v in PERSON["properties"].items()},
                 "type": "object"}
    first = compiler.compile(schema_format(PERSON))
    assert compiler.compile(schema_format(reordered, name="other", strict=True)) is first
    # the order of properties is the order the grammar writes them: a different grammar
    swapped = {**PERSON, "properties": dict(reversed(list(PERSON["properties"].items())))}
    assert compiler.compile(schema_format(swapped)) is not first
    compiler.compile(JSON_OBJECT)  # a third grammar: the least recently used (PERSON) is dropped
    assert compiler.compile(schema_format(PERSON)) is not first


def test_apply_masks_matches_a_bit_by_bit_reference():
    generator = torch.Generator().manual_seed(0)
    width = 100  # four words, the last one partly used
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=generator)
    logits = torch.randn(3, width, generator=generator)
    expected = logits.clone()
    for row in range(3):
        for token in range(width):
            if not (int(bitmask[row, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    assert torch.equal(apply_masks(logits.clone(), bitmask), expected)
    # only some rows of a mixed batch
    rows = torch.tensor([2, 0])
    partial = apply_masks(logits.clone(), bitmask[[2, 0]], rows)
    assert torch.equal(partial[[0, 2]], expected[[0, 2]]) and torch.equal(partial[1], logits[1])
    # logits wider than the mask: the columns past it are disallowed
    wide = apply_masks(torch.zeros(3, 140), bitmask)
    assert bool(torch.isinf(wide[:, 128:]).all())
    assert torch.equal(apply_masks(torch.zeros(3, width, dtype=torch.bfloat16), bitmask).isinf(), expected.isinf())


def test_bad_arguments_are_value_errors(tiny, tiny_tokenizer):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        GrammarCompiler(tiny_tokenizer, 200, [2])
    with pytest.raises(ValueError, match="eos_token_ids"):
        GrammarCompiler(tiny_tokenizer, TINY_WIDTH, [])
    with pytest.raises(ValueError, match="GrammarSettings.cache_size"):
        GrammarSettings(cache_size=0)
    matcher = tiny.compile(JSON_OBJECT).matcher()
    with pytest.raises(ValueError, match="bitmask row 0"):
        matcher.fill_mask(torch.zeros(1, 3, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="bitmask row 1"):
        matcher.fill_mask(tiny.allocate_bitmask(1), 1)


def test_bench_grammar_feeds_every_answer_through_every_installed_library(tmp_path, model_cache, monkeypatch):
    """`lorafleet bench grammar` on the tiny tokenizer: every library accepts every answer token (xgrammar
    only where the optional extra is installed), and the JSON report has the side-by-side summary."""
    from typer.testing import CliRunner

    from lorafleet.flows.cli import app

    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", str(model_cache))
    out = tmp_path / "grammar.json"
    result = CliRunner().invoke(app, ["bench", "grammar", "--models", "tiny-random-llama", "--answers", "3",
                                      "--rounds", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    libraries = report["tokenizers"][0]["libraries"]
    assert {"llguidance", "lorafleet_grammar"} <= set(libraries)
    for name, numbers in libraries.items():
        if "error" in numbers:  # xgrammar without the grammar-bench extra
            assert name == "xgrammar" and "not installed" in numbers["error"]
            continue
        assert set(numbers["grammars"]) == {"json_object", "extraction", "order_items"}
        for case in numbers["grammars"].values():
            assert case["rejected"] == 0 and case["tokens"] > 0 and case["per_token_us"] > 0
    assert report["summary"]["tiny-random-llama"]["extraction.per_token_us"]["llguidance"] > 0
    assert report["apply_mask"]["rows=1,threads=1"]["torch_us"] > 0
