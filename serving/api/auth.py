"""Who may call what: the Host-header check, the admin switch and API keys, in one pure ASGI middleware.

Every request the FastAPI app sees passes `AccessMiddleware` before any route runs, so no endpoint can
forget a check. The decisions, in order:

1. **Host header.** A web page on `evil.example` can make its own name resolve to 127.0.0.1 (DNS
   rebinding) and then call a localhost server as if it were its own origin; the browser still sends
   `Host: evil.example`, so a server that answers only to the names it is really reached by cannot be driven
   that way. `allowed_hosts` lists them (any port). Default on a loopback bind: `localhost`, `127.0.0.1`,
   `[::1]` and the bind address. A server bound beyond loopback cannot know the names clients use for it (an
   IP, a DNS name, a load balancer's), so its default is any host; what keeps a rebinding page out of
   `/admin` there is the admin key: admin is off on such a server unless an admin key is set, and a page cannot
   know the key (browsers attach cookies and HTTP auth by themselves, never a bearer token). Inference on a
   public server without a key is open to anyone who can reach it, rebinding or not: the launcher and the
   service warn loudly. A disallowed Host gets 400 `invalid_host`.
2. **Paths.** `/admin` and below is admin. The API docs (`/docs`, `/redoc`, `/openapi.json`) are open: they
   describe the API and hold no data. Everything else (`/v1/...`, unknown paths) is inference. BentoML answers
   `/livez`, `/readyz`, `/metrics` and its index page itself, before this app: they stay open so probes and
   Prometheus need no key (as in vLLM); note that `/metrics` carries adapter names as labels.
3. **Admin switch.** Admin is on when `admin_enabled` (false always wins) and either an admin key is set
   or the server binds to loopback only. An unknown bind address (a hand-run `bentoml serve` without
   `LORAFLEET_SERVE_BIND_HOST`) counts as public. Off: 403 `admin_disabled`, naming the setting.
4. **Keys**, sent as `Authorization: Bearer <key>`, compared in constant time (sha256 digests through
   `hmac.compare_digest`, so neither content nor length leaks). Inference needs a key when `api_keys` is set;
   an admin key works too. Admin needs an admin key when `admin_api_keys` is set, else an inference key when
   `api_keys` is set (a loopback server with keys serves nothing keyless), else none (loopback without keys, as
   before). No key or a wrong one: 401 with `WWW-Authenticate: Bearer`; an inference key on `/admin`: 403.
   Keys are never logged or echoed.

A request let through carries its `Caller` in the ASGI scope (`caller_of`): whether it holds admin rights,
which also decide whether it may load registry versions other than champion and challenger
(`AdapterCatalogue.resolve(any_version=...)`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.serving.settings import ServiceSettings, env_name

if TYPE_CHECKING:
    from starlette.applications import Starlette

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CALLER_SCOPE_KEY = "lorafleet.caller"
ADMIN_PREFIX = "/admin"
OPEN_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
CHALLENGE = 'Bearer realm="lorafleet"'


@dataclass(frozen=True)
class Caller:
    """What the middleware established about a request's sender."""

    admin: bool  # /admin and registry versions beyond champion/challenger


NOBODY = Caller(admin=False)


def caller_of(scope: Scope) -> Caller:
    """The caller the middleware let through; none recorded (no middleware ran) means no admin rights."""
    caller = scope.get(CALLER_SCOPE_KEY)
    return caller if isinstance(caller, Caller) else NOBODY


@dataclass(frozen=True)
class Denial:
    """An OpenAI-shaped refusal, sent by the middleware itself."""

    status: int
    message: str
    code: str
    type: str = "invalid_request_error"
    challenge: str | None = None  # the WWW-Authenticate value of a 401

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        return json.dumps({"error": error}).encode()


def is_loopback(host: str | None) -> bool:
    """Whether a bind address reaches this machine only. None (unknown) is not: fail safe."""
    if host is None:
        return False
    name = _strip_brackets(host.strip().lower()).rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve anywhere


def request_host(header: str | None) -> str | None:
    """The host name in a Host header, lowercased, without port or trailing dot; None if absent or malformed."""
    if not header:
        return None
    value = header.strip().lower()
    if value.startswith("["):  # [IPv6]:port
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:  # a bare IPv6 address has several colons: its "port" is not digits, so it is refused
        name, colon, port = value.partition(":")
        port = port if colon else None
    if port is not None and not (port.isascii() and port.isdigit()):
        return None
    return name.rstrip(".") or None


def host_allowed(name: str | None, patterns: Iterable[str]) -> bool:
    """Starlette's TrustedHostMiddleware rule: `*` any, `*.example.com` its subdomains, else exact."""
    for pattern in patterns:
        if pattern == ANY_HOST:
            return True
        if name is None:
            continue
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (scheme case-insensitive); None otherwise."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class AccessPolicy:
    """The rules of the module docstring, resolved once from the settings."""

    inference_keys: tuple[bytes, ...]  # sha256 digests: the keys themselves are not kept here
    admin_keys: tuple[bytes, ...]
    admin_off: str | None  # why admin is off (the 403 message); None: admin is on
    allowed_hosts: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> AccessPolicy:
        hosts = settings.allowed_hosts
        if hosts is None:
            hosts = (ANY_HOST,) if not is_loopback(settings.bind_host) else (*LOOPBACK_NAMES, settings.bind_host)
        return cls(
            inference_keys=tuple(_digest(key.get_secret_value()) for key in settings.api_keys),
            admin_keys=tuple(_digest(key.get_secret_value()) for key in settings.admin_api_keys),
            admin_off=_admin_off_reason(settings),
            allowed_hosts=tuple(dict.fromkeys(_strip_brackets(host.lower()).rstrip(".") for host in hosts)),
        )

    def check(self, path: str, host: str | None, authorization: str | None) -> Caller | Denial:
        """Let the request through (with its rights) or say why not."""
        if not host_allowed(request_host(host), self.allowed_hosts):
            shown = "no Host header" if not host else f"the Host header `{host[:100]}`"
            return Denial(400, f"this server does not answer to {shown}: the names it answers to are set by "
                          f"{env_name('allowed_hosts')}", code="invalid_host")
        token = bearer_token(authorization)
        digest = None if token is None else _digest(token)
        admin = self.admin_off is None and self._grants_admin(digest)
        if path in OPEN_PATHS:
            return Caller(admin=admin)
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            if self.admin_off is not None:
                return Denial(403, self.admin_off, code="admin_disabled")
            if admin:
                return Caller(admin=True)
            if digest is not None and _matches(digest, self.inference_keys):
                return Denial(403, "this API key grants inference only: the admin endpoints need a key from "
                              f"{env_name('admin_api_keys')}", code="insufficient_permissions")
            return _unauthorized("the admin endpoints", token)
        if self._grants_inference(digest):
            return Caller(admin=admin)
        return _unauthorized("this server", token)

    def _grants_admin(self, digest: bytes | None) -> bool:
        if self.admin_keys:
            return _matches(digest, self.admin_keys)
        if self.inference_keys:  # loopback with inference keys only: no keyless admin either
            return _matches(digest, self.inference_keys)
        return True  # loopback without keys (admin_off covers every other case)

    def _grants_inference(self, digest: bytes | None) -> bool:
        return not self.inference_keys or _matches(digest, self.inference_keys + self.admin_keys)


class AccessMiddleware:
    """Applies an `AccessPolicy` to every HTTP (and WebSocket) request; lifespan events pass untouched.

    `policy` is asked per request: None (the service is still starting) answers 503, as the routes would.
    Pure ASGI rather than Starlette's BaseHTTPMiddleware, so streamed answers and disconnects pass as they are.
    """

    def __init__(self, app: ASGIApp, policy: Callable[[], AccessPolicy | None]) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        policy = self.policy()
        if policy is None:
            outcome: Caller | Denial = Denial(503, "the service is still starting", code="not_ready",
                                              type="server_error")
        else:
            outcome = policy.check(_route_path(scope), _single_header(scope, b"host"),
                                   _single_header(scope, b"authorization"))
        if isinstance(outcome, Caller):
            scope[CALLER_SCOPE_KEY] = outcome
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
        else:
            await _send_denial(send, outcome)


class SettingsPolicy:
    """The policy of whatever settings `source` returns now, rebuilt only when that object changes."""

    def __init__(self, source: Callable[[], ServiceSettings | None]) -> None:
        self._source = source
        self._settings: ServiceSettings | None = None
        self._policy: AccessPolicy | None = None

    def __call__(self) -> AccessPolicy | None:
        settings = self._source()
        if settings is None:
            return None
        if settings is not self._settings:
            self._policy, self._settings = AccessPolicy.from_settings(settings), settings
        return self._policy


def install_access_control(app: Starlette) -> None:
    """Guard every route of `app` by the settings of `app.state.backend` (none yet: 503)."""

    def settings() -> ServiceSettings | None:
        backend = getattr(app.state, "backend", None)
        return None if backend is None else backend.settings

    app.add_middleware(AccessMiddleware, policy=SettingsPolicy(settings))


def exposure_warnings(settings: ServiceSettings) -> list[str]:
    """What these settings leave open to the network, one sentence each; [] on a loopback bind.

    Printed by `lorafleet serve` and logged by the service at start-up."""
    if is_loopback(settings.bind_host):
        return []
    where = (f"`{settings.bind_host}`" if settings.bind_host else
             f"an unknown address ({env_name('bind_host')} is unset: it was not started by `lorafleet serve`)")
    warnings = []
    if not settings.api_keys:
        rebinding = "" if settings.allowed_hosts and ANY_HOST not in settings.allowed_hosts else (
            f", and so can any web page its users open (DNS rebinding) unless {env_name('allowed_hosts')} "
            "names the hosts it is reached by")
        warnings.append(f"lorafleet listens on {where} and inference (/v1) needs no API key: anyone who can reach "
                        f"it can use it{rebinding}. Set {env_name('api_keys')}.")
    if settings.admin_enabled and not settings.admin_api_keys:
        warnings.append(f"lorafleet listens on {where} without an admin key: the admin endpoints (/admin) are "
                        f"OFF. Set {env_name('admin_api_keys')} to manage adapters on this server.")
    return warnings


def _admin_off_reason(settings: ServiceSettings) -> str | None:
    if not settings.admin_enabled:
        return (f"the admin endpoints are turned off on this server (setting admin_enabled, "
                f"{env_name('admin_enabled')})")
    if settings.admin_api_keys or is_loopback(settings.bind_host):
        return None
    where = (f"it listens on `{settings.bind_host}`" if settings.bind_host else
             f"its bind address is unknown: {env_name('bind_host')} is unset")
    return (f"the admin endpoints are off: this server may be reachable from the network ({where}) and has no "
            f"admin key; set {env_name('admin_api_keys')} to turn them on")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("latin-1", errors="replace")).digest()


def _matches(digest: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Compare against every key (no early exit), each in constant time."""
    found = False
    for key in keys:
        found |= digest is not None and hmac.compare_digest(digest, key)
    return found


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _route_path(scope: Scope) -> str:
    """The path the router matches (Starlette's `get_route_path`): without the mount's root_path."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def _single_header(scope: Scope, name: bytes) -> str | None:
    """The header's value; None when absent or repeated (two Host headers are an ambiguity, not a choice)."""
    values = [value for key, value in scope.get("headers", ()) if key.lower() == name]
    return values[0].decode("latin-1") if len(values) == 1 else None


async def _send_denial(send: Send, denial: Denial) -> None:
    body = denial.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if denial.challenge is not None:
        headers.append((b"www-authenticate", denial.challenge.encode()))
    await send({"type": "http.response.start", "status": denial.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _unauthorized(what: str, token: str | None) -> Denial:
    if token is None:
        return Denial(401, f"{what} needs an API key: send it as `Authorization: Bearer <key>`",
                      code="invalid_api_key", challenge=CHALLENGE)
    return Denial(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                  challenge=CHALLENGE + ', error="invalid_token"')
