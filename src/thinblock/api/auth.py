"""Who may call the admin API, and how: the one gate every HTTP request goes through.

``ApiGuard`` is an ASGI middleware in front of the whole app (API routes, ``/metrics``, the
OpenAPI document, ``/docs`` and whatever is added later), so a new route cannot bypass it.  In
order, for every request:

1. **Host** (DNS rebinding): with ``allowed_hosts`` configured, the ``Host`` header must be one
   of them (``400``).  The daemon configures the address it listens on (and, on loopback,
   ``localhost``/``127.0.0.1``/``[::1]`` with that port).
2. **Authentication** (except for the public GETs of the dashboard page, ``/docs``, their assets
   and the OpenAPI document, which hold no data; ``api/dashboard.py``): ``Authorization: Bearer <token>``; the configured ``api.token`` is an
   admin token, tokens created with ``thinblock token create`` carry their role.  A token is
   demanded when the configuration says so (``api.require_token``, a configured token, an address
   off loopback) or as soon as one token exists in the store; otherwise an anonymous caller is an
   admin (today's loopback default) -- and still goes through the cross-site checks below, which
   is what stops a web page in the administrator's browser.  ``401`` otherwise.
3. **Cross-site requests** (state-changing methods: POST, PUT, PATCH, DELETE): a browser may
   send a form (``application/x-www-form-urlencoded``, ``multipart/form-data``) or ``text/plain``
   to any site without asking, but not ``application/json`` (that needs a CORS preflight, which
   this API never answers: there is no CORS middleware, so no ``Access-Control-Allow-*`` header
   is ever sent).  So a state-changing request must say ``Content-Type: application/json``, also
   for the body-less actions (fail, rebuild, compact, ack, deletes): ``415`` otherwise.  An
   ``Origin`` header, when present, must be the API's own origin (scheme and the ``Host`` of the
   request), and ``Sec-Fetch-Site`` must not say ``cross-site``/``same-site``: ``403``.  A
   body-less action's body must be empty or ``{}`` (``400``), and bodies are bounded (``413``).
4. **Role**: read-only < operator < admin.  GETs need read-only; every state-changing route is
   listed in ``ROUTE_ROLES``; a state-changing route not listed needs admin (fails closed).
   ``403`` otherwise.
5. **Audit**: every state-changing call, refused or not, is one JSON line in the audit log (who,
   what, when, result) and a log record on ``thinblock.audit``.

Tokens are stored hashed (SHA-256 of a 256-bit random secret: a slow hash adds nothing to a
secret that cannot be guessed) in ``api-tokens.json`` in the data directory, mode 0600; the secret
is shown once, when created.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import AlreadyExists, NotFound
from ..privatefile import replace_json
from .nametypes import TokenName

log = logging.getLogger("thinblock.api")
audit_log = logging.getLogger("thinblock.audit")

TOKENS_FILE = "api-tokens.json"
AUDIT_FILE = "audit.log"
TOKEN_PREFIX = "tb_"
MAX_BODY = 1024 * 1024  # the largest request body the API reads (the biggest real one is < 5 KiB)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Role(enum.StrEnum):
    READ_ONLY = "read-only"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.READ_ONLY: 0, Role.OPERATOR: 1, Role.ADMIN: 2}

# Every state-changing route and the role it needs.  Operators run the storage (volumes, limits,
# compaction, rebuild, alerts); only admins change the hardware (PDs), destroy data (deleting
# volumes or pools), or manage tokens.  A route missing here needs admin.
ROUTE_ROLES: dict[tuple[str, str], Role] = {
    ("POST", "/api/v1/pds"): Role.ADMIN,
    ("POST", "/api/v1/pds/{pd_id}/fail"): Role.ADMIN,
    ("POST", "/api/v1/pds/{pd_id}/restore"): Role.ADMIN,
    ("POST", "/api/v1/pds/{pd_id}/replace"): Role.ADMIN,
    ("DELETE", "/api/v1/pds/{pd_id}"): Role.ADMIN,
    ("POST", "/api/v1/pools"): Role.OPERATOR,
    ("PATCH", "/api/v1/pools/{name}"): Role.OPERATOR,
    ("POST", "/api/v1/pools/{name}/compact"): Role.OPERATOR,
    ("DELETE", "/api/v1/pools/{name}"): Role.ADMIN,
    ("POST", "/api/v1/rebuild"): Role.OPERATOR,
    ("POST", "/api/v1/volumes"): Role.OPERATOR,
    ("PATCH", "/api/v1/volumes/{name}"): Role.OPERATOR,
    ("POST", "/api/v1/volumes/{name}/grow"): Role.OPERATOR,
    ("POST", "/api/v1/volumes/{name}/snapshots"): Role.OPERATOR,
    ("POST", "/api/v1/volumes/{name}/clones"): Role.OPERATOR,
    # A revert replaces the volume's data (as a delete does): admin.
    ("POST", "/api/v1/volumes/{name}/revert"): Role.ADMIN,
    ("DELETE", "/api/v1/volumes/{name}"): Role.ADMIN,
    # A rename frees the old name: a host reconnecting by it would reach whatever takes it next.
    ("POST", "/api/v1/volumes/{name}/rename"): Role.ADMIN,
    # Who may read and write a volume's data over NBD: an admin's decision, like tokens.
    ("POST", "/api/v1/volumes/{name}/access"): Role.ADMIN,
    ("DELETE", "/api/v1/volumes/{name}/access/{rule_id}"): Role.ADMIN,
    ("POST", "/api/v1/alerts/{alert_id}/ack"): Role.OPERATOR,
    # Moves the partner's volumes (their clients are disconnected and reconnect elsewhere).
    ("POST", "/api/v1/nodes/failback"): Role.ADMIN,
    ("POST", "/api/v1/tokens"): Role.ADMIN,
    ("DELETE", "/api/v1/tokens/{token_id}"): Role.ADMIN,
}
# Reads that only admins may make.
ADMIN_READS = frozenset({("GET", "/api/v1/tokens")})


def required_role(method: str, template: str | None) -> Role:
    """The role a request needs: listed, else read-only for reads and admin for the rest."""
    method = "GET" if method == "HEAD" else method
    if template is not None:
        if (method, template) in ROUTE_ROLES:
            return ROUTE_ROLES[(method, template)]
        if (method, template) in ADMIN_READS:
            return Role.ADMIN
    return Role.READ_ONLY if method in SAFE_METHODS else Role.ADMIN


# --- tokens --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: int
    name: str
    role: Role
    sha256: str
    created: float


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: a stored token, the configured token, or anonymous (no token needed)."""

    name: str
    role: Role
    token_id: int | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """API tokens with roles, kept hashed in a JSON file (or in memory when ``path`` is None).

    Written atomically (temporary file, fsync, rename) with mode 0600; the secrets themselves are
    never stored, only their SHA-256."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._records: list[TokenRecord] = []
        if path is not None and path.exists():
            self._records = self._load(path)

    @staticmethod
    def _load(path: Path) -> list[TokenRecord]:
        try:
            doc = json.loads(path.read_text())
            return [
                TokenRecord(
                    id=int(t["id"]),
                    name=str(t["name"]),
                    role=Role(t["role"]),
                    sha256=str(t["sha256"]),
                    created=float(t["created"]),
                )
                for t in doc["tokens"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Refusing to start beats starting with no tokens (which would open the API).
            raise RuntimeError(f"cannot read the API token store {path}: {exc}") from None

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {"version": 1, "tokens": [{**asdict(r), "role": str(r.role)} for r in self._records]}
        replace_json(self.path, doc)  # the directory fsynced too: a created token survives a crash

    def records(self) -> list[TokenRecord]:
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def create(self, name: str, role: Role) -> tuple[TokenRecord, str]:
        """A new token: its record and the secret (shown once; only its hash is kept)."""
        with self._lock:
            if any(r.name == name for r in self._records):
                raise AlreadyExists(f"a token named {name!r} exists already")
            secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
            next_id = max((r.id for r in self._records), default=0) + 1
            record = TokenRecord(next_id, name, role, _digest(secret), time.time())
            self._records.append(record)
            try:
                self._save()
            except OSError:
                self._records.remove(record)
                raise
            return record, secret

    def revoke(self, token_id: int) -> TokenRecord:
        with self._lock:
            for record in self._records:
                if record.id == token_id:
                    self._records.remove(record)
                    try:
                        self._save()
                    except OSError:
                        self._records.append(record)
                        raise
                    return record
        raise NotFound(f"token {token_id} not found")

    def find(self, secret: str) -> TokenRecord | None:
        digest = _digest(secret)
        found = None
        for record in self._records:  # every record compared, in constant time each
            if hmac.compare_digest(digest, record.sha256):
                found = record
        return found


# --- the audit log -------------------------------------------------------------------------------


class AuditLog:
    """One JSON line per state-changing call, appended and fsynced (mode 0600); also logged."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def record(self, entry: dict[str, Any]) -> None:
        audit_log.info(
            "%s %s by %s: %s",
            entry["method"],
            entry["path"],
            entry["who"],
            entry["status"],
            extra={"event": "audit", **{k: v for k, v in entry.items() if k in ("who", "status", "peer")}},
        )
        if self.path is None:
            return
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot write the audit log %s: %s", self.path, exc, extra={"event": "audit-failed"})


# --- configuration of the gate -------------------------------------------------------------------


@dataclass
class ApiSecurity:
    """What the gate enforces.  ``config_token``: the configured ``api.token`` (an admin token);
    ``require_token``: demand a token even when the store is empty; ``allowed_hosts``: the
    ``Host`` values accepted (None: any, as behind a name the daemon cannot know)."""

    config_token: str | None = None
    require_token: bool = False
    tokens: TokenStore | None = None
    audit: AuditLog | None = None
    allowed_hosts: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = TokenStore(None)
        if self.audit is None:
            self.audit = AuditLog(None)

    @classmethod
    def for_data_dir(
        cls,
        data_dir: Path | None,
        *,
        config_token: str | None = None,
        require_token: bool = False,
        allowed_hosts: Iterable[str] | None = None,
    ) -> ApiSecurity:
        return cls(
            config_token=config_token,
            require_token=require_token or config_token is not None,
            tokens=TokenStore(data_dir / TOKENS_FILE if data_dir is not None else None),
            audit=AuditLog(data_dir / AUDIT_FILE if data_dir is not None else None),
            allowed_hosts=frozenset(h.lower() for h in allowed_hosts) if allowed_hosts is not None else None,
        )

    @property
    def token_required(self) -> bool:
        assert self.tokens is not None
        return self.require_token or self.config_token is not None or len(self.tokens) > 0

    def authenticate(self, authorization: bytes) -> Principal | str:
        """The caller, or why not (the 401 message)."""
        assert self.tokens is not None
        if not authorization:
            if self.token_required:
                return "missing bearer token"
            return Principal("anonymous", Role.ADMIN)
        scheme, _, secret_bytes = authorization.partition(b" ")
        secret = secret_bytes.strip().decode("latin-1")
        if scheme.lower() != b"bearer" or not secret:
            return "wrong bearer token"
        if self.config_token is not None and hmac.compare_digest(
            secret.encode("latin-1"), self.config_token.encode()
        ):
            return Principal("config-token", Role.ADMIN)
        record = self.tokens.find(secret)
        if record is not None:
            return Principal(record.name, record.role, record.id)
        # Also where no token is needed: a wrong (say, revoked) token is a mistake worth telling.
        return "wrong bearer token"


def loopback_hosts(port: int) -> frozenset[str]:
    """The ``Host`` values a browser sends for an API on loopback at ``port``."""
    return frozenset(f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]"))


# --- the gate ------------------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of the OpenAPI document: what the gate needs to know about a route."""

    method: str
    template: str
    pattern: re.Pattern[str]
    takes_body: bool


# An operation without parameters says so in the OpenAPI document (its body must be {} or empty).
NO_PARAMETERS = "x-thinblock-no-parameters"


def operations_of(schema: dict[str, Any]) -> list[Operation]:
    """The operations an OpenAPI document describes, the most specific paths first.

    The gate works from the document rather than from the framework's route objects: it is
    generated from the route table, so a new route is in it, and its shape does not change
    between FastAPI versions.  A route left out of the document (``include_in_schema=False``)
    is unknown here: it needs admin for anything but a read, and the cross-site checks apply to
    every state-changing request, known or not."""
    ops = []
    for template, item in schema.get("paths", {}).items():
        pattern = _template_regex(template)
        for method, operation in item.items():
            if not isinstance(operation, dict):
                continue
            ops.append(Operation(method.upper(), template, pattern, not operation.get(NO_PARAMETERS, False)))
    ops.sort(key=lambda op: (op.template.count("{"), op.template))
    return ops


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


def _find(ops: Iterable[Operation], method: str, path: str) -> Operation | None:
    method = "GET" if method == "HEAD" else method
    for op in ops:
        if op.method == method and op.pattern.match(path):
            return op
    return None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json"


class ApiGuard:
    """The ASGI middleware described in the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        security: ApiSecurity,
        openapi: Callable[[], dict[str, Any]],
        public: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.app = app
        self.security = security
        self.openapi = openapi
        # (method, path) -> served without authentication: the dashboard page and /docs with their
        # assets (api/dashboard.py).  A browser cannot send a bearer token when it opens a page.
        self.public = public
        self._ops: list[Operation] | None = None

    def operations(self) -> list[Operation]:
        if self._ops is None:  # built on the first request, when every route is in place
            self._ops = operations_of(self.openapi())
        return self._ops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        headers = {k.decode("latin-1"): v for k, v in scope.get("headers", [])}
        host = headers.get("host", b"").decode("latin-1").lower()
        op = _find(self.operations(), method, scope["path"])
        template = op.template if op is not None else None
        state_changing = method not in SAFE_METHODS
        principal: Principal | None = None
        started = time.time()

        async def refuse(status: int, message: str, extra_headers: dict[str, str] | None = None) -> None:
            if state_changing:
                self._audit(scope, principal, template, started, status, message)
            await _error(status, message, extra_headers)(scope, receive, send)

        security = self.security
        if security.allowed_hosts is not None and host not in security.allowed_hosts:
            await refuse(400, f"unexpected Host header {host!r}: not an address this API answers on")
            return
        if self.public is not None and self.public(method, scope["path"]):
            await self.app(scope, receive, send)
            return
        who = security.authenticate(headers.get("authorization", b""))
        if isinstance(who, str):
            await refuse(401, f"unauthorized: {who}", {"WWW-Authenticate": "Bearer"})
            return
        principal = who

        body: bytes | None = None
        if state_changing:
            fetch_site = headers.get("sec-fetch-site", b"").decode("latin-1").lower()
            origin = headers.get("origin")
            if fetch_site in ("cross-site", "same-site"):
                await refuse(403, f"cross-site request refused (Sec-Fetch-Site: {fetch_site})")
                return
            if origin is not None:
                scheme = scope.get("scheme", "http")
                if origin.decode("latin-1").lower() != f"{scheme}://{host}":
                    await refuse(403, f"cross-site request refused: Origin {origin.decode('latin-1')!r}")
                    return
            content_type = headers.get("content-type", b"").decode("latin-1")
            if not _is_json(content_type):
                await refuse(
                    415,
                    "state-changing requests must have Content-Type: application/json "
                    f"(got {content_type or 'none'}); send {{}} for actions without parameters",
                )
                return
            body = await _read_body(receive, MAX_BODY)
            if body is None:
                await refuse(413, f"request body larger than {MAX_BODY} bytes")
                return
            if op is not None and not op.takes_body and not _empty_json_object(body):
                await refuse(400, "invalid request: this action takes no parameters: send {} or nothing")
                return

        needed = required_role(method, template)
        if not principal.role.allows(needed):
            await refuse(
                403,
                f"forbidden: {method} {template or scope['path']} needs the {needed} role "
                f"(token {principal.name!r} is {principal.role})",
            )
            return

        scope.setdefault("state", {})["principal"] = principal
        if body is None:
            await self.app(scope, receive, send)
            return
        status_seen: list[int] = []

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, _replay(body, receive), send_recording)
        finally:
            self._audit(scope, principal, template, started, status_seen[0] if status_seen else 500, None)

    def _audit(
        self,
        scope: Scope,
        principal: Principal | None,
        template: str | None,
        started: float,
        status: int,
        refused: str | None,
    ) -> None:
        client = scope.get("client")
        entry: dict[str, Any] = {
            "time": round(started, 3),
            "who": principal.name if principal is not None else "unauthenticated",
            "role": str(principal.role) if principal is not None else None,
            "token_id": principal.token_id if principal is not None else None,
            "peer": f"{client[0]}:{client[1]}" if client else None,
            "method": scope["method"],
            "path": scope["path"],
            "route": template,
            "status": status,
            "result": "ok" if 200 <= status < 300 else ("refused" if refused is not None else "failed"),
        }
        if refused is not None:
            entry["reason"] = refused
        assert self.security.audit is not None
        self.security.audit.record(entry)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _empty_json_object(body: bytes) -> bool:
    text = body.strip()
    if not text:
        return True
    try:
        return json.loads(text) == {}
    except ValueError:
        return False


# --- token management routes ---------------------------------------------------------------------


class TokenOut(BaseModel):
    id: int
    name: str
    role: Role
    created: float


class TokenCreated(TokenOut):
    token: str  # the secret: shown this once, only its hash is kept


class TokenCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "ci", "role": "operator"}]}
    )

    name: TokenName
    role: Role


def token_router(security: ApiSecurity) -> APIRouter:
    router = APIRouter(tags=["tokens"])
    store = security.tokens
    assert store is not None

    def out(record: TokenRecord) -> TokenOut:
        return TokenOut(id=record.id, name=record.name, role=record.role, created=record.created)

    @router.get("/tokens")
    async def list_tokens() -> list[TokenOut]:
        """API tokens (admin only); never their secrets."""
        return [out(r) for r in store.records()]

    @router.post("/tokens", status_code=201)
    async def create_token(body: TokenCreate) -> TokenCreated:
        """A new token with a role; the secret is in this answer only.  The first token created
        makes the API demand a token from every caller."""
        record, secret = store.create(body.name, body.role)
        log.info(
            "API token created",
            extra={"event": "token-created", "token": record.name, "role": str(record.role)},
        )
        return TokenCreated(**out(record).model_dump(), token=secret)

    @router.delete("/tokens/{token_id}", status_code=204)
    async def revoke_token(token_id: Annotated[int, PathParam(ge=1, le=2**63 - 1)]) -> Response:
        record = store.revoke(token_id)
        log.info("API token revoked", extra={"event": "token-revoked", "token": record.name})
        return Response(status_code=204)

    return router


__all__ = [
    "ROUTE_ROLES",
    "ApiGuard",
    "ApiSecurity",
    "AuditLog",
    "Principal",
    "Role",
    "TokenStore",
    "loopback_hosts",
    "required_role",
    "token_router",
]
