"""A connection to a gateway's management API, as an admin writes it and as it is shown.

Its secrets (``token``, ``password``) are sealed together (``secret_box``) before they
are stored and are never shown: a view says only whether each is set.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlparse

import msgspec

from sidecar.core.catalog_diff import Removal
from sidecar.core.errors import InvalidInput
from sidecar.core.models import DEFAULT_TENANT, TENANT_RE, check_id
from sidecar.integrations.apigee.mapping import ApigeeMapping
from sidecar.integrations.kong.mapping import KongMapping

CONNECTION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
ConnectionType = Literal["kong", "konnect", "apigee"]
# How often the reconciler syncs a connection by default: Kong's Admin API is cheap to
# walk; Apigee's Management API is polled every 5 minutes (its webhooks are the push).
DEFAULT_INTERVALS = {"kong": 60, "konnect": 60, "apigee": 300}
SECRET_FIELDS = ("token", "password")
REDACTED = "<redacted>"  # what a view shows for a secret that is set


class ConnectionSpec(msgspec.Struct, forbid_unknown_fields=True):
    """``token``: the Kong-Admin-Token, a Konnect personal/system access token, or an
    Apigee bearer token; ``username``/``password``: Apigee Edge basic credentials."""

    type: ConnectionType
    base_url: str
    tenant: str = DEFAULT_TENANT
    workspace: str | None = None  # kong
    control_plane_id: str | None = None  # konnect
    organization: str | None = None  # apigee
    environments: list[str] = []  # apigee
    username: str | None = None
    token: str | None = None
    password: str | None = None
    sync_interval_seconds: int | None = None
    removal: Removal = Removal.REVOKE
    mapping: dict[str, Any] = {}

    def validated(self) -> ConnectionSpec:
        check_id(self.tenant, TENANT_RE, "tenant")
        try:
            url = urlparse(self.base_url)
            url.port  # noqa: B018 (read for its check: a port that is not a number raises)
        except ValueError:
            url = None
        if (
            url is None
            or url.scheme not in ("http", "https")
            or not url.hostname
            or not _PRINTABLE.fullmatch(self.base_url)
        ):
            raise InvalidInput("base_url must be an http(s) URL with a host", field="base_url")
        if self.type == "konnect" and not self.control_plane_id:
            raise InvalidInput("a konnect connection names its control_plane_id", field="control_plane_id")
        if self.type == "apigee" and not self.organization:
            raise InvalidInput("an apigee connection names its organization", field="organization")
        interval = self.sync_interval_seconds
        if interval is not None and not 10 <= interval <= 7 * 86_400:
            raise InvalidInput(
                "sync_interval_seconds must be between 10 and 604800", field="sync_interval_seconds"
            )
        for name in SECRET_FIELDS:
            value = getattr(self, name)
            if value is not None and len(value) > 4096:
                raise InvalidInput(f"{name} must be up to 4096 characters (empty: remove it)", field=name)
            # Sent in HTTP headers (a bearer token, basic auth): printable ASCII only.
            if value is not None and not _PRINTABLE.fullmatch(value):
                raise InvalidInput(f"{name} must be printable ASCII characters", field=name)
        # A bad mapping is refused now, not at the first sync.
        if self.type == "apigee":
            self.apigee_mapping()
        else:
            self.kong_mapping()
        return self

    def interval(self) -> int:
        return self.sync_interval_seconds or DEFAULT_INTERVALS[self.type]

    def secrets(self) -> dict[str, str]:
        """The secrets this write gives ("" removes one; a view's REDACTED keeps it)."""
        given = {name: getattr(self, name) for name in SECRET_FIELDS}
        return {name: value for name, value in given.items() if value is not None and value != REDACTED}

    def pushes_status(self) -> bool:
        """Whether a consumer's suspension or revocation is pushed to this gateway."""
        mapping = self.apigee_mapping() if self.type == "apigee" else self.kong_mapping()
        return mapping.push_status

    def kong_mapping(self) -> KongMapping:
        if self.type not in ("kong", "konnect"):
            return KongMapping()
        try:
            return msgspec.convert(self.mapping, KongMapping)
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"mapping: {exc}", field="mapping") from None

    def apigee_mapping(self) -> ApigeeMapping:
        if self.type != "apigee":
            return ApigeeMapping()
        try:
            return msgspec.convert(self.mapping, ApigeeMapping).validated()
        except (msgspec.ValidationError, ValueError) as exc:
            raise InvalidInput(f"mapping: {exc}", field="mapping") from None


class SyncResult(msgspec.Struct):
    at: str  # ISO 8601 UTC
    ok: bool
    counts: dict[str, int] = {}
    error: str | None = None  # the error code
    message: str | None = None


class ConnectionView(msgspec.Struct):
    """A connection as the API shows it: secrets redacted."""

    id: str
    tenant: str
    type: str
    base_url: str
    workspace: str | None
    control_plane_id: str | None
    organization: str | None
    environments: list[str]
    username: str | None
    token: str | None  # "<redacted>" when set
    password: str | None
    secret_key_id: str | None  # which key sealed the secrets
    sync_interval_seconds: int
    removal: str
    mapping: dict[str, Any]
    created_at: str
    updated_at: str
    last_sync: SyncResult | None = None
