"""Admin endpoints under `/admin`: list, load, unload and reload adapters while the server runs.

Who may call them is decided before any route runs, by `serving/api/auth.py`: admin is on only with an admin
key or on a loopback-only server, and never with `admin_enabled=False` (`LORAFLEET_SERVE_ADMIN_ENABLED=false`),
which answers 403. Reading local folders is off separately until `adapter_roots` names the folders an admin
may load from.

Errors are OpenAI-shaped, as in `openai_api`: unknown model 404, bad body 400, path outside the
roots 403, unloading an adapter that running requests use 409, unload on a generator that cannot evict
(the PEFT backend: `UnloadNotSupported`) 501. The generator is reached only through its interface
(`serving/generation/interface.py`): nothing here asks which generator runs.
Bodies are bounded where they enter (the models below): a name follows its name rule, a `model` or a
`path` has a maximum length and no control characters (a NUL byte), so no such value reaches the
catalogue or the file system and each is a 400 naming its parameter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lorafleet.names import (
    MAX_MODEL_REFERENCE,
    MAX_PATH_LENGTH,
    NAME_RULE,
    control_characters,
    is_registered_name,
)
from lorafleet.serving.api.auth import caller_of
from lorafleet.serving.api.openai_api import ApiError, require_backend
from lorafleet.serving.backend import ServingBackend
from lorafleet.serving.catalogue.adapters import (
    AdapterCatalogue,
    AdapterIncompatible,
    AdapterLoadFailed,
    ServedModel,
)
from lorafleet.serving.catalogue.local_adapters import (
    LOCAL_NAME,
    LOCAL_NAME_RULE,
    InvalidLocalAdapter,
    PathNotAllowed,
)
from lorafleet.serving.catalogue.model_names import ModelNotFound
from lorafleet.serving.experiments import ExperimentError
from lorafleet.serving.generation.interface import ResidentAdapter, TokenGenerator, UnloadNotSupported
from lorafleet.serving.settings import env_name

log = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", tags=["admin"])
T = TypeVar("T")


def _printable(value: str) -> str:
    found = control_characters(value)
    if found:
        raise ValueError(f"must not contain control characters (found {', '.join(found)})")
    return value


def _local_name(value: str) -> str:
    if LOCAL_NAME.match(value) is None:
        raise ValueError(f"must be {LOCAL_NAME_RULE}")
    return value


def _registered_name_rule(value: str) -> str:
    if not is_registered_name(value):
        raise ValueError(f"reload takes a registered model name (NAME): {NAME_RULE}")
    return value


ModelReference = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_REFERENCE), AfterValidator(_printable)]
LocalName = Annotated[str, Field(min_length=1), AfterValidator(_local_name)]
FolderPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH_LENGTH), AfterValidator(_printable)]
RegisteredName = Annotated[str, AfterValidator(_registered_name_rule)]


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelReference | None = Field(None, description="NAME, NAME@VERSION, NAME@ALIAS, models:/...")
    name: LocalName | None = Field(None, description="serve a local folder under this name")
    path: FolderPath | None = Field(None, description="an absolute adapter folder under adapter_roots")

    @model_validator(mode="after")
    def _one_source(self) -> LoadBody:
        if self.model is not None and (self.name is not None or self.path is not None):
            raise ValueError("give either `model` (a registry model) or `name` and `path`, not both")
        if self.model is None and (self.name is None or self.path is None):
            raise ValueError("give `model` (a registry model) or both `name` and `path` (a local folder)")
        return self


class UnloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelReference


class ReloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: RegisteredName | None = Field(None, description="a registered model name; omitted: all")


@router.get("/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    backend = _admin(request)
    return await asyncio.to_thread(_listing, backend)


@router.post("/adapters/load")
async def load_adapter(body: LoadBody, request: Request) -> dict[str, Any]:
    backend = _admin(request)
    catalogue = backend.catalogue
    if body.model is not None:
        entry = await _call(catalogue.load, body.model, warm=backend.warm)
    else:
        entry = await _call(catalogue.load_local, body.name, Path(body.path or ""), warm=backend.warm)
    if entry.adapter is None:
        raise ApiError(400, "the base model is always loaded: name an adapter", param="model")
    resident = _resident(backend.generator).get(entry.adapter)
    return {**_card(entry, catalogue), "resident": resident is not None,
            "slot": None if resident is None else resident.slot}


@router.post("/adapters/unload")
async def unload_adapter(body: UnloadBody, request: Request) -> dict[str, Any]:
    """Evict the adapter from the engine's cache now. It stays served: its next request reads it again.
    Refused (409) while running requests use it, so nothing is cut off mid-generation."""
    backend = _admin(request)
    entry = await _call(backend.catalogue.resolve, body.model, load=False)
    if entry.adapter is None:
        raise ApiError(400, "the base model cannot be unloaded", param="model")
    generator = backend.generator
    try:
        unloaded = await asyncio.to_thread(generator.unload, entry.adapter)
    except UnloadNotSupported as error:
        raise ApiError(501, f"{error}; serve with {env_name('backend')}=engine", code="not_supported",
                       type="server_error") from None
    if not unloaded:
        resident = _resident(generator).get(entry.adapter)
        if resident is not None:
            raise ApiError(409, f"{entry.id} is in use by running requests: retry once they finish",
                           param="model", code="adapter_in_use")
    return {**_card(entry, backend.catalogue), "unloaded": unloaded}


@router.post("/adapters/reload")
async def reload_adapters(request: Request, body: ReloadBody | None = None) -> dict[str, Any]:
    """Follow moved `champion` aliases now (what the poller does every `registry_poll_s`)."""
    backend = _admin(request)
    if backend.reloader is None:
        raise ApiError(400, "this server has no model registry to reload from", code="no_registry")
    names = None if body is None or body.model is None else [_registered_name(backend.catalogue, body.model)]
    try:
        changes = await _call(backend.reloader.reload, names)
    except ApiError:
        raise
    except Exception as error:  # noqa: BLE001 - the registry itself failed: nothing was changed
        log.warning("reload failed: %s", error)
        raise ApiError(503, f"the model registry could not be read: {type(error).__name__}: {error}",
                       code="registry_unavailable") from None
    return {"object": "list", "data": [
        {"name": change.name, "old_version": change.old_version, "new_version": change.new_version,
         "changed": change.changed, "error": change.error}
        for change in changes
    ]}


class ExperimentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: RegisteredName = Field(description="the registered adapter name whose champion and challenger split")
    challenger_share: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] = Field(
        0.1, description="fraction of the NAME requests sent to the challenger")


@router.get("/experiments")
async def list_experiments(request: Request) -> dict[str, Any]:
    backend = _admin(request)
    cards = [await _experiment_card(backend, name) for name in backend.experiments.names()]
    return {"object": "list", "data": [card for card in cards if card is not None]}


@router.post("/experiments")
async def start_experiment(body: ExperimentBody, request: Request) -> dict[str, Any]:
    """Start an A/B split of NAME between its champion and challenger, or change the share of a running one."""
    backend = _admin(request)
    champion = await _call(backend.catalogue.resolve, body.model)
    if champion.version is None:
        raise ApiError(400, f"`{body.model}` is served from a local folder: experiments split registry versions "
                       "(champion and challenger)", param="model")
    challenger = await _call(backend.catalogue.resolve, f"{body.model}@challenger")
    if challenger.version == champion.version:
        raise ApiError(400, f"`{body.model}`'s challenger is its champion (v{champion.version}): register a new "
                       "version first", param="model", code="nothing_to_compare")
    backend.experiments.start(body.model, body.challenger_share)
    return await _experiment_card(backend, body.model)


@router.get("/experiments/{name}")
async def read_experiment(name: str, request: Request) -> dict[str, Any]:
    backend = _admin(request)
    card = await _experiment_card(backend, _experiment_name(name))
    if card is None:
        raise ApiError(404, f"no experiment is running for {name!r}", param="name", code="experiment_not_found")
    return card


@router.delete("/experiments/{name}")
async def stop_experiment(name: str, request: Request) -> dict[str, Any]:
    """End the experiment: NAME goes back to its champion alone; the final statistics are returned."""
    backend = _admin(request)
    try:
        experiment = backend.experiments.stop(_experiment_name(name))
    except ExperimentError as error:
        raise ApiError(error.status, str(error), param="name", code="experiment_not_found") from None
    return {**experiment.as_dict(), "ended": True}


# -- helpers ---------------------------------------------------------------------------------------


def _experiment_name(name: str) -> str:
    if not is_registered_name(name):
        raise ApiError(400, f"name: must be {NAME_RULE}", param="name")
    return name


async def _experiment_card(backend: ServingBackend, name: str) -> dict[str, Any] | None:
    """An experiment's statistics per arm, with each arm's engine adapter and speculation tau right now."""
    experiment = backend.experiments.get(name)
    if experiment is None:
        return None
    card = experiment.as_dict()
    tau = (await asyncio.to_thread(backend.generator.stats)).spec_tau
    for arm in card["arms"]:
        try:
            served = await asyncio.to_thread(backend.catalogue.resolve, f"{name}@{arm}")
        except Exception as error:  # noqa: BLE001 - a card still shows the counts when an alias is gone
            card["arms"][arm].update(serving=None, error=f"{type(error).__name__}: {error}")
            continue
        card["arms"][arm].update(serving=served.version, adapter=served.adapter,
                                 spec_tau=tau.get(served.adapter or ""))
    return card


def _admin(request: Request) -> ServingBackend:
    backend = require_backend(request)
    if not caller_of(request.scope).admin:  # a backstop: the access middleware refused such callers already
        raise ApiError(403, "the admin endpoints need admin rights (see serving/api/auth.py)", code="admin_disabled")
    return backend


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking catalogue call off the event loop; its errors become OpenAI-shaped ones."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except ModelNotFound as error:
        raise ApiError(404, str(error), param="model", code="model_not_found") from None
    except AdapterIncompatible as error:
        raise ApiError(400, str(error), param="model", code="model_incompatible") from None
    except InvalidLocalAdapter as error:
        raise ApiError(400, str(error), param=error.param, code="invalid_adapter") from None
    except PathNotAllowed as error:
        raise ApiError(403, f"{error}; the allowed folders are set by {env_name('adapter_roots')}", param="path",
                       code="path_not_allowed") from None
    except AdapterLoadFailed as error:
        raise ApiError(400, str(error), code="adapter_load_failed") from None


def _registered_name(catalogue: AdapterCatalogue, name: str) -> str:
    """`name` (already checked by the name rule), unless it is served from a local folder."""
    try:
        entry = catalogue.resolve(name, load=False)
    except ModelNotFound:
        return name  # not served yet: the reload may add it, or answer 404
    if entry.version is None:
        raise ApiError(400, f"`{name}` is served from a local folder, not the registry: load its path again "
                       "to reload it", param="model")
    return name


def _listing(backend: ServingBackend) -> dict[str, Any]:
    catalogue = backend.catalogue
    resident = []
    for adapter, row in _resident(backend.generator).items():
        entry = catalogue.by_adapter(adapter)
        resident.append({**row.as_dict(), "id": None if entry is None else entry.id,
                         "name": None if entry is None else entry.name,
                         "version": None if entry is None else entry.version, "pinned": bool(row.running)})
    registered, registry_error = [], None
    if catalogue.registry is not None:
        try:
            registered = [{"name": model.name, "aliases": model.aliases, "versions": list(model.versions)}
                          for model in catalogue.registry.registered_models()]
        except Exception as error:  # noqa: BLE001 - the listing still shows what is served
            registry_error = f"{type(error).__name__}: {error}"
    stats = backend.generator.stats()
    return {
        "base_model": catalogue.base.id,
        "backend": stats.backend,
        "adapter_slots": stats.adapter_slots,
        "registry_poll_s": backend.poller.interval_s if backend.poller is not None else 0,
        "served": [_card(entry, catalogue) for entry in catalogue.models() if entry.adapter is not None],
        "resident": resident,
        "registered": registered,
        "registry_error": registry_error,
    }


def _resident(generator: TokenGenerator) -> dict[str, ResidentAdapter]:
    """adapter name -> what the generator holds of it."""
    return {row.adapter: row for row in generator.resident()}


def _card(entry: ServedModel, catalogue: AdapterCatalogue) -> dict[str, Any]:
    champion = entry.name is not None and catalogue.champions().get(entry.name) == entry.version
    return {"id": entry.id, "name": entry.name, "version": entry.version, "adapter": entry.adapter,
            "source": entry.source, "champion": champion and entry.version is not None,
            "attached": catalogue.is_attached(entry.adapter or "")}
