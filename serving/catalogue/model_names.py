"""What a request's `model` string may say, checked before anything is looked up.

`model` may be the base model id, `NAME`, `NAME@VERSION` (digits), `models:/NAME/VERSION`, `NAME@ALIAS` or
`models:/NAME@ALIAS` (what each means is the catalogue's business, `adapters.py`). It comes from
unauthenticated clients: `split_model` checks every spelling against the name rules (`lorafleet.names`; a
local adapter's own rule for a bare `NAME`), so a bad name is a 404 that touched neither the registry nor
the disk.
"""

from __future__ import annotations

from lorafleet.names import MAX_MODEL_REFERENCE, VERSION_PATTERN, is_alias, is_registered_name, shorten
from lorafleet.serving.catalogue.local_adapters import LOCAL_NAME

MODELS_URI = "models:/"


class ModelNotFound(LookupError):
    """The request's `model` names nothing this server can serve (HTTP 404)."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"the model `{shorten(model)}` does not exist: {reason}")
        self.model = model


def split_model(model: str) -> tuple[str, str | None]:
    """`model` as (NAME, selector or None); ModelNotFound for a spelling that is none of the above.

    NAME must follow the registered-model name rule, or, without a selector, a local adapter's name
    rule; a selector is a version number (at most 18 digits) or an alias. Nothing else reaches the
    registry or the disk: not `..`, a NUL byte, 5,000 characters or a name no folder could have."""
    hint = "use NAME, NAME@ALIAS, NAME@VERSION, models:/NAME@ALIAS, models:/NAME/VERSION or the base model id"
    if len(model) > MAX_MODEL_REFERENCE:
        raise ModelNotFound(model, f"a model name is at most {MAX_MODEL_REFERENCE} characters; {hint}")
    if model.startswith(MODELS_URI):
        rest = model[len(MODELS_URI):]
        if "@" in rest:
            name, _, selector = rest.partition("@")
        else:
            name, _, selector = rest.rpartition("/")
            if not selector.isdigit():  # MLflow's stages (`/Production`) are deprecated: aliases replace them
                raise ModelNotFound(model, hint)
    else:
        name, has_selector, selector = model.partition("@")
        selector = selector if has_selector else None
    if selector is None:
        valid = is_registered_name(name) or LOCAL_NAME.match(name) is not None
    else:
        number = selector.isascii() and selector.isdigit()
        valid = is_registered_name(name) and (VERSION_PATTERN.match(selector) is not None if number
                                              else is_alias(selector))
    if not valid:
        raise ModelNotFound(model, hint)
    return name, selector
