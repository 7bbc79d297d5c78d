"""MCP workspaces: who registered, under which id and token, and who may use which.

A workspace is a Positron window's project (docs/mcp.md): Positron registers it with
`POST /mcp/workspaces`, and agents reach it at `/mcp/w/<workspace_id>` on the MCP listener with
its token. Pure bookkeeping, no I/O: the REST routes, the listener's gate and /status ask it.
"""

from __future__ import annotations

import datetime as dt
import enum
import hmac
import re
import secrets

import attrs

#: Ids travel in URL paths: a conservative alphabet, no dots at the start, bounded.
_WORKSPACE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: A supplied token is kept if it looks like a secret: long enough, header-safe characters.
_TOKEN = re.compile(r"[A-Za-z0-9_.~+/=-]{16,512}")
_SLUG_DROP = re.compile(r"[^a-z0-9]+")


class Access(enum.Enum):
    ALLOWED = "allowed"
    #: No token, or one no workspace has (HTTP 401).
    UNAUTHORIZED = "unauthorized"
    #: The token of another workspace (HTTP 403).
    FORBIDDEN = "forbidden"


def well_formed_id(workspace_id: str) -> bool:
    return _WORKSPACE_ID.fullmatch(workspace_id) is not None


def well_formed_token(token: str) -> bool:
    return _TOKEN.fullmatch(token) is not None


def new_workspace_token() -> str:
    return secrets.token_urlsafe(32)


def mint_workspace_id(display_name: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """`<slug of the display name>-<8 hex>`, e.g. `my-project-3fa9c0d1`; the slug is at most
    40 characters and `workspace` when the name has no letters or digits."""
    slug = _SLUG_DROP.sub("-", display_name.lower()).strip("-")[:40].strip("-") or "workspace"
    while True:
        candidate = f"{slug}-{secrets.token_hex(4)}"
        if candidate not in taken:
            return candidate


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@attrs.define(eq=False)
class Workspace:
    id: str
    display_name: str
    token: str
    registered_at: dt.datetime


class WorkspaceBook:
    """The registered workspaces, by id."""

    def __init__(self) -> None:
        self.workspaces: dict[str, Workspace] = {}

    def __repr__(self) -> str:
        return f"<WorkspaceBook {sorted(self.workspaces)}>"

    def __len__(self) -> int:
        return len(self.workspaces)

    def register(self, *, workspace_id: str | None, display_name: str,
                 token: str | None) -> Workspace:
        """Add a workspace, or update one registered again under its id (Positron re-registers
        after a window reload with the id and token it kept). Raises ValueError, with a message
        for the client, on a malformed id or token."""
        if workspace_id is None:
            workspace_id = mint_workspace_id(display_name, set(self.workspaces))
        elif not well_formed_id(workspace_id):
            raise ValueError(
                "workspace_id must be 1 to 128 characters of letters, digits, '_', '.' and "
                "'-', starting with a letter or digit")
        if token is not None and not well_formed_token(token):
            raise ValueError("token must be 16 to 512 characters of letters, digits and "
                             "'_.~+/=-'")
        existing = self.workspaces.get(workspace_id)
        if existing is not None:
            existing.display_name = display_name
            if token is not None:
                existing.token = token
            return existing
        workspace = Workspace(workspace_id, display_name, token or new_workspace_token(),
                              dt.datetime.now(dt.UTC))
        self.workspaces[workspace_id] = workspace
        return workspace

    def remove(self, workspace_id: str) -> Workspace | None:
        return self.workspaces.pop(workspace_id, None)

    def get(self, workspace_id: str) -> Workspace | None:
        return self.workspaces.get(workspace_id)

    def access(self, workspace_id: str, authorization: str | None) -> Access:
        """May a request carrying `authorization` use `workspace_id`? Every token is compared
        in constant time, so that timing tells neither the token nor which workspace has it."""
        token = bearer_token(authorization)
        if token is None:
            return Access.UNAUTHORIZED
        presented = token.encode("utf-8", errors="surrogateescape")
        owner = None
        for workspace in self.workspaces.values():
            if hmac.compare_digest(presented, workspace.token.encode("utf-8")):
                owner = workspace.id
        if owner is None:
            return Access.UNAUTHORIZED
        return Access.ALLOWED if owner == workspace_id else Access.FORBIDDEN


__all__ = [
    "Access",
    "Workspace",
    "WorkspaceBook",
    "bearer_token",
    "mint_workspace_id",
    "new_workspace_token",
    "well_formed_id",
    "well_formed_token",
]
