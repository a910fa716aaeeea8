"""A Kong emulator for plugin-server tests, written from Kong's external plugin protocol.

What Kong does with a Python plugin server (Kong 3.x, ``kong/runloop/plugin_servers/``)
and what this module does the same way:

- starts the plugin server with its ``start_cmd`` and learns the plugin from its
  ``query_cmd`` (a JSON list of ``{Name, Phases, Priority, Version, Schema}``);
- validates a plugin configuration against that schema and fills defaults as Kong's
  Admin API does, adds Kong's bookkeeping keys and sends ``plugin.StartInstance``
  with ``Config`` as a JSON string;
- speaks MessagePack-RPC over the unix socket: requests ``[0, msgid, method, [arg]]``
  (params always an array holding one argument), responses ``[1, msgid, error, result]``,
  notifications ``[2, label, args]``; connections come from a keep-alive pool, one
  RPC at a time each, many at once;
- runs a phase as ``plugin.HandleEvent {InstanceId, EventName}`` and answers every PDK
  call the plugin makes with ``plugin.Step`` or the typed step Kong uses for that
  method (``StepConsumer``, ``StepCredential``, ``StepRoute``, ``StepService``,
  ``StepMultiMap``), or ``plugin.StepError`` when the PDK function fails, until the
  answer is ``"ret"``; ``kong.response.exit`` ends the event with no step (Kong's
  coroutine yields for good);
- restarts an instance and retries once when the server answers "no plugin instance";
- runs the log phase after the response with the request's data saved:
  ``kong.log.serialize`` answers a JSON string of Kong's serialized log.

It records what the plugin did (PDK calls, exit status/body/headers, response and
upstream headers, ctx) and fails loudly (``UnemulatedPdkCall``) on a PDK method it does
not emulate, or one called in a phase where Kong refuses it (``PdkPhaseError``), after
answering it with ``StepError`` so the plugin server's handler thread is not left
waiting.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SOCKET = "aforo-authorize.sock"
ALL_PHASES = frozenset(
    {"certificate", "rewrite", "access", "header_filter", "response", "body_filter", "log"}
)
_REQUEST_PHASES = frozenset({"rewrite", "access", "header_filter", "response", "body_filter", "log"})
_AFTER_ROUTING = frozenset({"access", "header_filter", "response", "body_filter", "log"})
_BEFORE_PROXY = frozenset({"rewrite", "access"})


class EmulatorError(AssertionError):
    """The plugin did something Kong would not accept, or the emulator cannot follow."""


class UnemulatedPdkCall(EmulatorError):
    """The plugin called a PDK method this emulator does not emulate."""


class PdkPhaseError(EmulatorError):
    """The plugin called a PDK method in a phase where Kong refuses it."""


class RpcError(Exception):
    """The plugin server answered an RPC with an error."""

    def __init__(self, method: str, error: Any) -> None:
        super().__init__(f"{method}: {error}")
        self.method = method
        self.error = error


# --- the plugin server process -------------------------------------------------------


def plugin_command(prefix: str | Path) -> list[str]:
    """The start command, as ``aforo-kong-plugin -p <prefix>`` would run it."""
    return [sys.executable, "-m", "kong_plugin.server", "-p", str(prefix)]


def query_command() -> list[str]:
    return [sys.executable, "-m", "kong_plugin.server", "--dump"]


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def query_plugin_info(command: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> dict:
    """Run the query command as Kong does at start and take the first plugin's info."""
    done = subprocess.run(
        list(command or query_command()),
        capture_output=True,
        env=_child_env(env),
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise EmulatorError(f"query_cmd failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    dump = json.loads(done.stdout)
    if not isinstance(dump, list | dict):
        raise EmulatorError(f"not a plugin info table: {done.stdout!r}")
    plugins = dump.get("Plugins", dump) if isinstance(dump, dict) else dump
    return plugins[0]


class PluginServerProcess:
    """The real plugin server, started as Kong's ``start_cmd`` would start it."""

    def __init__(
        self,
        prefix: str | Path,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        socket_name: str = PLUGIN_SOCKET,
    ) -> None:
        self.prefix = Path(prefix)
        self.command = list(command or plugin_command(self.prefix))
        self.env = _child_env(env)
        self.socket_path = str(self.prefix / socket_name)
        self.log_path = self.prefix / f"plugin-server-{uuid.uuid4().hex[:8]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PluginServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmulatorError(f"plugin server exited ({self.proc.returncode}): {self.log_text()}")
            if os.path.exists(self.socket_path):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    if probe.connect_ex(self.socket_path) == 0:
                        return self
            time.sleep(0.05)
        self.kill()
        raise EmulatorError(f"plugin server did not listen on {self.socket_path}: {self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, as Kong stops plugin servers; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise EmulatorError(f"plugin server ignored SIGTERM for {timeout}s") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- Kong's schema handling (the subset plugin schemas use) ---------------------------

_FIELD_ATTRS = frozenset(
    {
        "type",
        "required",
        "default",
        "description",
        "one_of",
        "between",
        "len_min",
        "len_max",
        "elements",
        "keys",
        "values",
        "fields",
        "gt",
        "match",
        "referenceable",
        "encrypted",
    }
)
_TYPES = frozenset({"string", "integer", "number", "boolean", "array", "set", "map", "record"})


class SchemaError(EmulatorError):
    pass


def check_plugin_schema(info: Mapping[str, Any]) -> None:
    """The plugin info as Kong's metaschema would judge it (the attributes this
    emulator knows; an attribute it does not know is an error, not a pass)."""
    schema = info["Schema"]
    if schema.get("name") != info["Name"]:
        raise SchemaError("schema name differs from the plugin name")
    fields = schema.get("fields")
    if not isinstance(fields, list) or len(fields) != 1 or "config" not in fields[0]:
        raise SchemaError("plugin schema must hold exactly one field, config")
    config = fields[0]["config"]
    if config.get("type") != "record":
        raise SchemaError("config must be a record")
    _check_fields(config.get("fields"), "config")


def _check_fields(fields: Any, path: str) -> None:
    if not isinstance(fields, list):
        raise SchemaError(f"{path}: fields must be an array")
    for entry in fields:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SchemaError(f"{path}: each field is a map with exactly one key")
        ((name, spec),) = entry.items()
        _check_field(spec, f"{path}.{name}")


def _check_field(spec: Any, path: str) -> None:
    if not isinstance(spec, dict):
        raise SchemaError(f"{path}: not a field definition")
    unknown = set(spec) - _FIELD_ATTRS
    if unknown:
        raise SchemaError(f"{path}: unknown attributes {sorted(unknown)}")
    if spec.get("type") not in _TYPES:
        raise SchemaError(f"{path}: invalid type {spec.get('type')!r}")
    description = spec.get("description")
    if description is not None and not 10 <= len(description) <= 500:
        raise SchemaError(f"{path}: description must be 10 to 500 characters")
    if "between" in spec and (not isinstance(spec["between"], list) or len(spec["between"]) != 2):
        raise SchemaError(f"{path}: between takes two numbers")
    if spec["type"] in ("array", "set"):
        if "elements" not in spec:
            raise SchemaError(f"{path}: {spec['type']} needs elements")
        _check_field(spec["elements"], f"{path}[]")
    if spec["type"] == "map":
        _check_field(spec.get("keys"), f"{path}.keys")
        _check_field(spec.get("values"), f"{path}.values")
    if spec["type"] == "record":
        _check_fields(spec.get("fields"), path)
    if spec.get("default") is not None:
        _validate(spec, copy.deepcopy(spec["default"]), f"{path} (default)")


def apply_schema(info: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a plugin config as Kong's Admin API does and fill it as Kong stores
    it: defaults applied, unset optional fields null. Raises SchemaError."""
    fields = info["Schema"]["fields"][0]["config"]["fields"]
    return _fill_record(fields, config, "config")


def _fill_record(fields: list[dict[str, Any]], value: Mapping[str, Any], path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SchemaError(f"{path}: expected a record")
    known = {name for entry in fields for name in entry}
    unknown = set(value) - known
    if unknown:
        raise SchemaError(f"{path}: unknown field(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for entry in fields:
        ((name, spec),) = entry.items()
        item = value.get(name)
        if item is None and spec.get("default") is not None:
            item = copy.deepcopy(spec["default"])
        if spec["type"] == "record" and item is None and spec.get("required"):
            item = {}
        out[name] = _validate(spec, item, f"{path}.{name}")
    return out


def _validate(spec: Mapping[str, Any], value: Any, path: str) -> Any:
    if value is None:
        if spec.get("required"):
            raise SchemaError(f"{path}: required field missing")
        return None
    kind = spec["type"]
    if kind == "string":
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected a string")
        # Kong's strings default to len_min = 1.
        if len(value) < spec.get("len_min", 1):
            raise SchemaError(f"{path}: length must be at least {spec.get('len_min', 1)}")
        if "len_max" in spec and len(value) > spec["len_max"]:
            raise SchemaError(f"{path}: length must be at most {spec['len_max']}")
    elif kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{path}: expected an integer")
    elif kind == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise SchemaError(f"{path}: expected a number")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected a boolean")
    elif kind in ("array", "set"):
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected an array")
        value = [_validate(spec["elements"], item, f"{path}[{i}]") for i, item in enumerate(value)]
    elif kind == "map":
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a map")
        value = {
            _validate(spec["keys"], k, f"{path}.<key>"): _validate(spec["values"], v, f"{path}.{k}")
            for k, v in value.items()
        }
    elif kind == "record":
        value = _fill_record(spec["fields"], value, path)
    if "one_of" in spec and value not in spec["one_of"]:
        raise SchemaError(f"{path}: expected one of: {', '.join(map(str, spec['one_of']))}")
    if "between" in spec:
        low, high = spec["between"]
        if not low <= value <= high:
            raise SchemaError(f"{path}: value should be between {low} and {high}")
    return value


# --- the emulated request ------------------------------------------------------------


def default_service() -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "name": "catalog",
        "protocol": "http",
        "host": "upstream.internal",
        "port": 80,
        "path": "/",
    }


def default_route() -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "name": "catalog-route", "paths": ["/catalog"], "protocols": ["http"]}


@dataclass
class KongRequest:
    """A client request as Kong sees it once routed and authenticated."""

    method: str = "GET"
    path: str = "/catalog/items"
    headers: dict[str, str | list[str]] = field(default_factory=dict)
    consumer: dict[str, Any] | None = None
    credential: dict[str, Any] | None = None
    route: dict[str, Any] | None = field(default_factory=default_route)
    service: dict[str, Any] | None = field(default_factory=default_service)
    client_ip: str = "192.0.2.10"
    body_size: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # PDK methods that fail for this request: answered with plugin.StepError(message).
    pdk_errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Upstream:
    """What the upstream service answers when Kong proxies the request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    body_size: int = 128
    latency_ms: int = 4


@dataclass
class PdkCall:
    phase: str
    method: str
    args: list[Any]
    step: str  # the RPC that answered it; "" for a terminal call
    result: Any = None
    error: str | None = None


@dataclass
class PhaseRun:
    phase: str
    calls: list[PdkCall] = field(default_factory=list)
    rpcs: int = 0  # round trips: HandleEvent plus one per answered PDK call
    seconds: float = 0.0

    @property
    def methods(self) -> list[str]:
        return [call.method for call in self.calls]


@dataclass
class Exit:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Exchange:
    """One request through the access phase, the upstream (unless the plugin ended it)
    and the log phase, with everything the plugin did."""

    request: KongRequest
    access: PhaseRun
    log: PhaseRun | None = None
    exit: Exit | None = None
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    upstream_headers: dict[str, str] = field(default_factory=dict)
    ctx_shared: dict[str, Any] = field(default_factory=dict)
    serialized: dict[str, Any] | None = None
    logs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def proxied(self) -> bool:
        return self.exit is None

    def header(self, name: str) -> str | None:
        """A response header sent to the client (case-insensitive)."""
        for key, value in self.response_headers.items():
            if key.lower() == name.lower():
                return value
        return None


class _State:
    """Kong's per-request data the PDK functions read and write."""

    def __init__(self, request: KongRequest) -> None:
        self.request = request
        self.phase = "access"
        # ngx.req headers: lower-case names; service.request.set_header writes here too.
        self.request_headers: dict[str, str | list[str]] = {k.lower(): v for k, v in request.headers.items()}
        self.exchange: Exchange | None = None
        self.ctx_shared: dict[str, Any] = {}
        self.response_headers: dict[str, str] = {}
        self.upstream_headers: dict[str, str] = {}
        self.response_status: int | None = None
        self.serialized: dict[str, Any] | None = None
        self.exit: Exit | None = None
        self.logs: list[tuple[str, str]] = []


def _header_value(headers: Mapping[str, Any], name: Any) -> Any:
    if not isinstance(name, str):
        raise EmulatorError(f"header name must be a string, got {name!r}")
    value = headers.get(name.lower())
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _multimap(headers: Mapping[str, Any]) -> dict[str, list[str]]:
    # mp_rpc.lua's fix_mmap: every value travels as an array.
    return {k: list(v) if isinstance(v, list) else [v] for k, v in headers.items()}


def _check_headers_table(value: Any, method: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in value.items()
    ):
        raise EmulatorError(f"{method}: headers must be a table of name -> string, got {value!r}")
    return {k: str(v) for k, v in value.items()}


def _set_response_header(state: _State, args: list[Any]) -> None:
    name, value = args
    state.response_headers.update(_check_headers_table({name: value}, "kong.response.set_header"))


def _set_response_headers(state: _State, args: list[Any]) -> None:
    state.response_headers.update(_check_headers_table(args[0], "kong.response.set_headers"))


def _set_upstream_headers(state: _State, headers: dict[str, str]) -> None:
    state.upstream_headers.update(headers)
    # ngx.req.set_header: the request's own headers change, as the log later shows.
    for name, value in headers.items():
        state.request_headers[name.lower()] = value


def _response_exit(state: _State, args: list[Any]) -> None:
    status = args[0] if args else None
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise EmulatorError(f"kong.response.exit: code must be a number between 100 and 599, got {status!r}")
    body = args[1] if len(args) > 1 else None
    headers = _check_headers_table(args[2], "kong.response.exit") if len(args) > 2 and args[2] else {}
    state.exit = Exit(status, body, headers)


def _serialize(state: _State, args: list[Any]) -> str:
    # Kong answers the log phase's serialize with the data saved for the log timer,
    # JSON-encoded (plugin_servers/plugin.lua).
    return json.dumps(state.serialized)


def _log_call(level: str) -> Callable[[_State, list[Any]], None]:
    def record(state: _State, args: list[Any]) -> None:
        state.logs.append((level, " ".join(str(a) for a in args)))

    return record


@dataclass(frozen=True)
class PdkMethod:
    phases: frozenset[str]
    handler: Callable[[_State, list[Any]], Any]
    step: str = "plugin.Step"
    terminal: bool = False


def default_pdk() -> dict[str, PdkMethod]:
    """The PDK methods this emulator answers: name -> phases, typed step, behaviour."""
    table: dict[str, PdkMethod] = {
        "kong.client.get_consumer": PdkMethod(
            _AFTER_ROUTING, lambda s, a: s.request.consumer, "plugin.StepConsumer"
        ),
        "kong.client.get_credential": PdkMethod(
            _AFTER_ROUTING, lambda s, a: s.request.credential, "plugin.StepCredential"
        ),
        "kong.router.get_route": PdkMethod(_AFTER_ROUTING, lambda s, a: s.request.route, "plugin.StepRoute"),
        "kong.router.get_service": PdkMethod(
            _AFTER_ROUTING, lambda s, a: s.request.service, "plugin.StepService"
        ),
        "kong.request.get_header": PdkMethod(
            _REQUEST_PHASES, lambda s, a: _header_value(s.request_headers, a[0] if a else None)
        ),
        "kong.request.get_headers": PdkMethod(
            _REQUEST_PHASES, lambda s, a: _multimap(s.request_headers), "plugin.StepMultiMap"
        ),
        "kong.request.get_method": PdkMethod(_REQUEST_PHASES, lambda s, a: s.request.method),
        "kong.request.get_path": PdkMethod(_REQUEST_PHASES, lambda s, a: s.request.path),
        "kong.response.get_status": PdkMethod(
            frozenset({"header_filter", "response", "body_filter", "log"}), lambda s, a: s.response_status
        ),
        "kong.response.set_header": PdkMethod(
            frozenset({"rewrite", "access", "header_filter", "response"}), _set_response_header
        ),
        "kong.response.set_headers": PdkMethod(
            frozenset({"rewrite", "access", "header_filter", "response"}), _set_response_headers
        ),
        "kong.response.exit": PdkMethod(_BEFORE_PROXY, _response_exit, "", terminal=True),
        "kong.service.request.set_header": PdkMethod(
            _BEFORE_PROXY,
            lambda s, a: _set_upstream_headers(s, _check_headers_table({a[0]: a[1]}, "set_header")),
        ),
        "kong.service.request.set_headers": PdkMethod(
            _BEFORE_PROXY,
            lambda s, a: _set_upstream_headers(s, _check_headers_table(a[0], "set_headers")),
        ),
        "kong.ctx.shared.get": PdkMethod(_REQUEST_PHASES, lambda s, a: s.ctx_shared.get(a[0])),
        "kong.ctx.shared.set": PdkMethod(_REQUEST_PHASES, lambda s, a: s.ctx_shared.__setitem__(a[0], a[1])),
        "kong.log.serialize": PdkMethod(frozenset({"log"}), _serialize),
    }
    for level in ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug"):
        table[f"kong.log.{level}"] = PdkMethod(ALL_PHASES, _log_call(level))
    return table


def _request_length(request: KongRequest, headers: Mapping[str, Any]) -> int:
    # $request_length: request line, headers and body, as received.
    size = len(f"{request.method} {request.path} HTTP/1.1\r\n") + 2 + request.body_size
    for name, value in headers.items():
        for item in value if isinstance(value, list) else [value]:
            size += len(f"{name}: {item}\r\n")
    return size


def _bytes_sent(status: int, headers: Mapping[str, str], body_size: int) -> int:
    size = len(f"HTTP/1.1 {status} X\r\n") + 2 + body_size
    return size + sum(len(f"{k}: {v}\r\n") for k, v in headers.items())


# --- the RPC client ------------------------------------------------------------------


class _Connection:
    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def read(self) -> Any:
        while True:
            for message in self.unpacker:
                return message
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("plugin server closed the connection")
            self.unpacker.feed(data)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Instance:
    name: str
    config: dict[str, Any]  # as Kong stores it (defaults filled) plus its bookkeeping keys
    id: int = -1
    starts: int = 0


class KongEmulator:
    def __init__(
        self,
        socket_path: str,
        info: Mapping[str, Any],
        pdk: Mapping[str, PdkMethod] | None = None,
        rpc_timeout: float = 15.0,
    ) -> None:
        self.socket_path = socket_path
        self.info = dict(info)
        self.pdk = dict(default_pdk() if pdk is None else pdk)
        self.rpc_timeout = rpc_timeout
        self.notifications: list[tuple[Any, Any]] = []
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    # --- RPC -------------------------------------------------------------------------

    def call(self, method: str, *args: Any) -> Any:
        """One RPC on a pooled connection; the result, or RpcError."""
        with self._lock:
            msgid = next(self._ids)
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = _Connection(self.socket_path, self.rpc_timeout)
        try:
            conn.sock.sendall(msgpack.packb([0, msgid, method, list(args)], use_bin_type=True))
            while True:
                message = conn.read()
                if message[0] == 2:
                    self.notifications.append((message[1], message[2]))
                    continue
                if message[0] != 1 or message[1] != msgid:
                    raise EmulatorError(f"unexpected RPC message {message!r} for #{msgid} {method}")
                break
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._idle.append(conn)
        if message[2] is not None:
            raise RpcError(method, message[2])
        return message[3]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # --- instances -------------------------------------------------------------------

    def start_instance(self, config: Mapping[str, Any] | None = None) -> Instance:
        """Configure the plugin (Admin API validation and defaults), then StartInstance."""
        stored = apply_schema(self.info, config or {})
        stored["__plugin_id"] = str(uuid.uuid4())
        stored["__key__"] = f"plugins:{self.info['Name']}::::"
        stored["__seq__"] = next(self._seq)
        instance = Instance(self.info["Name"], stored)
        self._start(instance)
        return instance

    def _start(self, instance: Instance) -> None:
        status = self.call(
            "plugin.StartInstance", {"Name": instance.name, "Config": json.dumps(instance.config)}
        )
        instance.id = status["Id"]
        instance.starts += 1

    def close_instance(self, instance: Instance) -> Any:
        return self.call("plugin.CloseInstance", instance.id)

    # --- phases ----------------------------------------------------------------------

    def _event(self, instance: Instance, phase: str, state: _State) -> PhaseRun:
        run = PhaseRun(phase)
        state.phase = phase
        started = time.perf_counter()
        try:
            step_in = self.call("plugin.HandleEvent", {"InstanceId": instance.id, "EventName": phase})
        except RpcError as exc:
            if "no plugin instance" not in str(exc.error).lower():
                raise
            # Kong: reset the instance, start it again, handle the event again.
            self._start(instance)
            step_in = self.call("plugin.HandleEvent", {"InstanceId": instance.id, "EventName": phase})
        run.rpcs += 1
        event_id = step_in["EventId"]
        while step_in["Data"] != "ret":
            data = step_in["Data"]
            if not isinstance(data, dict) or "Method" not in data:
                raise EmulatorError(f"unexpected event data {data!r}")
            method, args = data["Method"], list(data.get("Args") or [])
            spec = self.pdk.get(method)
            problem: EmulatorError | None = None
            if spec is None:
                problem = UnemulatedPdkCall(f"PDK method {method} is not emulated (args {args!r})")
            elif phase not in spec.phases:
                problem = PdkPhaseError(f"{method} cannot be called in the {phase} phase")
            if problem is not None:
                # Free the plugin's handler thread before failing the test.
                run.calls.append(PdkCall(phase, method, args, "plugin.StepError", error=str(problem)))
                self.call("plugin.StepError", {"EventId": event_id, "Data": str(problem)})
                raise problem
            assert spec is not None
            failure = state.request.pdk_errors.get(method)
            if failure is not None:
                run.calls.append(PdkCall(phase, method, args, "plugin.StepError", error=failure))
                step_in = self.call("plugin.StepError", {"EventId": event_id, "Data": failure})
                run.rpcs += 1
                continue
            result = spec.handler(state, args)
            run.calls.append(PdkCall(phase, method, args, spec.step, result))
            if spec.terminal:
                break
            step_in = self.call(spec.step, {"EventId": event_id, "Data": result})
            run.rpcs += 1
        run.seconds = time.perf_counter() - started
        return run

    def play(
        self,
        instance: Instance,
        request: KongRequest | None = None,
        upstream: Upstream | None = None,
        *,
        log_phase: bool = True,
    ) -> Exchange:
        """Run one request through the plugin's phases as Kong would."""
        request = request or KongRequest()
        upstream = upstream or Upstream()
        phases = set(self.info["Phases"])
        state = _State(request)
        access = self._event(instance, "access", state) if "access" in phases else PhaseRun("access")
        exchange = Exchange(request, access, exit=state.exit)
        if state.exit is not None:
            body = state.exit.body
            # Kong encodes a table body as JSON with this content type.
            encoded = json.dumps(body) if isinstance(body, dict | list) else (body or "")
            headers = (
                {"Content-Type": "application/json; charset=utf-8"} if isinstance(body, dict | list) else {}
            )
            headers.update(state.exit.headers)
            exchange.status = state.exit.status
            exchange.response_headers = headers
            body_size, source, proxy_ms = len(encoded.encode()), "exit", -1
        else:
            exchange.status = upstream.status
            exchange.response_headers = {**upstream.headers, **state.response_headers}
            body_size, source, proxy_ms = upstream.body_size, "service", upstream.latency_ms
        state.response_status = exchange.status
        exchange.upstream_headers = dict(state.upstream_headers)
        exchange.ctx_shared = state.ctx_shared
        if log_phase and "log" in phases:
            state.serialized = self._serialized(state, exchange, body_size, source, proxy_ms)
            exchange.serialized = state.serialized
            exchange.log = self._event(instance, "log", state)
        exchange.logs = state.logs
        return exchange

    def _serialized(
        self, state: _State, exchange: Exchange, body_size: int, source: str, proxy_ms: int
    ) -> dict[str, Any]:
        """kong.log.serialize() of this request, as Kong 3.x builds it."""
        request = state.request
        headers = copy.deepcopy(state.request_headers)
        for secret in ("authorization", "proxy-authorization"):
            if secret in headers:
                headers[secret] = "REDACTED"
        kong_ms = round(exchange.access.seconds * 1000)
        data: dict[str, Any] = {
            "request": {
                "id": request.request_id,
                "uri": request.path,
                "url": f"http://gateway.test:8000{request.path}",
                "querystring": {},
                "method": request.method,
                "headers": headers,
                "size": _request_length(request, state.request_headers),
            },
            "upstream_uri": request.path if source == "service" else "",
            "upstream_status": str(exchange.status) if source == "service" else "",
            "response": {
                "status": exchange.status,
                "headers": {k.lower(): v for k, v in exchange.response_headers.items()},
                "size": _bytes_sent(exchange.status, exchange.response_headers, body_size),
            },
            "latencies": {
                "kong": kong_ms,
                "proxy": proxy_ms,
                "request": kong_ms + max(proxy_ms, 0) + 1,
                "receive": 0,
            },
            "route": request.route,
            "service": request.service,
            "client_ip": request.client_ip,
            "started_at": int(time.time() * 1000) - kong_ms - max(proxy_ms, 0) - 1,
            "source": source,
            "workspace": "default-workspace-id",
            "workspace_name": "default",
        }
        if request.consumer is not None:
            data["consumer"] = request.consumer
        if request.credential is not None:
            data["authenticated_entity"] = {
                "id": request.credential.get("id"),
                "consumer_id": (request.consumer or {}).get("id"),
            }
        return data
