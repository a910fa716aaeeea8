"""`aforo-sidecar`: serve, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence

import msgspec

from sidecar import __version__
from sidecar.config import Settings, SettingsError, load_settings

# CLI flag -> Settings field, for the flags `serve` and `demo` share.
_SERVER_FLAGS = {
    "host": "host",
    "port": "port",
    "admin_token": "admin_token",
    "log_level": "log_level",
    "grpc_port": "grpc_port",
    "decision_port": "decision_port",
}


_TOPOLOGY_HELP = (
    "auto|standalone|cluster|sentinel (AFORO_REDIS_TOPOLOGY, default auto: the URL's scheme, "
    "and a redis:// node is asked whether it is a cluster node)"
)


def _server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (AFORO_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (AFORO_PORT, default 8080)")
    parser.add_argument(
        "--decision-port",
        type=int,
        help="fast decision port (AFORO_DECISION_PORT, default 8081; 0 turns it off)",
    )
    parser.add_argument(
        "--grpc-port", type=int, help="gRPC port (AFORO_GRPC_PORT, default 9090; 0 turns gRPC off)"
    )
    parser.add_argument(
        "--admin-token", help="bearer token of the admin API (AFORO_ADMIN_TOKEN, default unset: admin off)"
    )
    parser.add_argument(
        "--log-level", help="critical|error|warning|info|debug (AFORO_LOG_LEVEL, default info)"
    )
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aforo-sidecar",
        description="Aforo gateway sidecar: per-request quota and wallet decisions.",
    )
    parser.add_argument("--version", action="version", version=f"aforo-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the decision service")
    _server_args(serve)
    serve.add_argument(
        "--redis-url",
        help="Redis URL (AFORO_REDIS_URL): redis://, rediss://, unix://, "
        "redis+cluster://h:p,h:p, redis+sentinel://h:p,h:p/master; default unset: the embedded store",
    )
    serve.add_argument("--redis-topology", help=_TOPOLOGY_HELP)
    serve.add_argument("--workers", type=int, help="worker processes (AFORO_WORKERS, default 1)")
    serve.add_argument(
        "--fail-mode",
        help="open|closed: the answer when Redis is unreachable (AFORO_FAIL_MODE, default open)",
    )
    serve.add_argument(
        "--decision-timeout-ms",
        type=int,
        help="deadline of one decision in ms (AFORO_DECISION_TIMEOUT_MS, default 50)",
    )
    serve.add_argument("--key-prefix", help="Redis key prefix (AFORO_KEY_PREFIX, default aforo:)")

    serve.add_argument(
        "--database-url", help="Postgres URL (AFORO_DATABASE_URL, default unset): admin writes go there first"
    )

    demo = sub.add_parser("demo", help="run on the embedded store with a demo catalog")
    _server_args(demo)

    migrate = sub.add_parser("migrate", help="apply the Postgres schema migrations (idempotent)")
    _data_args(migrate, redis=False)

    reconcile = sub.add_parser(
        "reconcile", help="keep Redis in step with Postgres and drain usage into Postgres"
    )
    _data_args(reconcile, redis=True)
    mode = reconcile.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one full sync and a complete drain, then exit")
    mode.add_argument("--report", action="store_true", help="print the reconciliation report and exit")
    reconcile.add_argument("--json", action="store_true", help="with --report: JSON instead of a table")

    pull = sub.add_parser("apigee-pull", help="pull Apigee analytics for a time range into the sidecar")
    from sidecar.integrations.apigee.analytics_pull import add_arguments

    add_arguments(pull)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="{verify}")
    verify = audit_sub.add_parser("verify", help="check the audit log's hash chain (exit 1 if broken)")
    _data_args(verify, redis=False)
    return parser


def _data_args(parser: argparse.ArgumentParser, *, redis: bool) -> None:
    parser.add_argument("--database-url", help="Postgres URL (AFORO_DATABASE_URL, required)")
    if redis:
        parser.add_argument("--redis-url", help="Redis URL (AFORO_REDIS_URL, required)")
        parser.add_argument("--redis-topology", help=_TOPOLOGY_HELP)
        parser.add_argument("--key-prefix", help="Redis key prefix (AFORO_KEY_PREFIX, default aforo:)")
    parser.add_argument(
        "--log-level", help="critical|error|warning|info|debug (AFORO_LOG_LEVEL, default info)"
    )


def _settings(args: argparse.Namespace, extra: dict[str, object]) -> Settings:
    overrides = {field: getattr(args, flag, None) for flag, field in _SERVER_FLAGS.items()}
    overrides.update(extra)
    return load_settings(overrides)


def _run(settings: Settings, access_log: bool) -> None:
    import uvicorn

    from sidecar.http.guarded_http import GuardedHttpToolsProtocol
    from sidecar.tls import uvicorn_options

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": access_log,
        "timeout_graceful_shutdown": 5,
        # Limits on hostile input, as on the decision port (sidecar/http/guarded_http.py).
        "http": GuardedHttpToolsProtocol,
        **uvicorn_options(settings),
    }
    if settings.workers == 1:
        from sidecar.server import build_app

        uvicorn.run(build_app(settings), **common)
        return
    # Workers are separate processes: they rebuild the settings from the environment
    # and share one Prometheus directory so /metrics adds them up.
    os.environ.update(settings.to_env())
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="aforo-metrics-"))
    uvicorn.run("sidecar.server:app_from_env", factory=True, workers=settings.workers, **common)


def _demo(settings: Settings, access_log: bool) -> None:
    from sidecar.core.clock import now_ms
    from sidecar.demo import curl_examples, load_demo
    from sidecar.server import build_app
    from sidecar.store.memory_store import MemoryStore

    store = MemoryStore()
    api_key = asyncio.run(load_demo(store, now_ms()))
    base = f"http://{settings.host}:{settings.port}"
    print("Aforo sidecar demo: embedded store, plans free/pro/metered, consumers")
    print("app-free, app-pro (10.00 prepaid), app-metered (postpaid).")
    print(f"admin token: {settings.admin_token}\n")
    print(curl_examples(base, settings.admin_token or "", api_key))
    if settings.decision_port:
        print(
            f"# the decision port (the fast path for gateways) answers the same decisions:\n"
            f'curl -s -d \'{{"consumer_id":"app-free","product":"any-api"}}\' '
            f"http://{settings.host}:{settings.decision_port}/v1/authorize"
        )
    if settings.grpc_port:
        print(
            f"# gRPC (aforo.sidecar.v1.Sidecar, envoy.service.ratelimit.v3) on {settings.host}:"
            f"{settings.grpc_port}, with reflection:\n"
            f'grpcurl -plaintext -d \'{{"consumer_id":"app-free","product":"any-api"}}\' '
            f"{settings.host}:{settings.grpc_port} aforo.sidecar.v1.Sidecar/Authorize"
        )
    print(flush=True)
    import uvicorn

    from sidecar.http.guarded_http import GuardedHttpToolsProtocol

    uvicorn.run(
        build_app(settings, store),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=access_log,
        http=GuardedHttpToolsProtocol,
    )


def _data_settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(
        {
            "database_url": args.database_url,
            "redis_url": getattr(args, "redis_url", None),
            "redis_topology": getattr(args, "redis_topology", None),
            "key_prefix": getattr(args, "key_prefix", None),
            "log_level": args.log_level,
        }
    )
    if settings.database_url is None:
        raise SettingsError("this command needs Postgres: set AFORO_DATABASE_URL or --database-url")
    if (
        getattr(args, "redis_url", None) is None
        and args.command == "reconcile"
        and settings.redis_url is None
    ):
        raise SettingsError("reconcile needs Redis: set AFORO_REDIS_URL or --redis-url")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "apigee-pull":
        from sidecar.integrations.apigee.analytics_pull import pull

        return pull(args)
    if args.command == "audit" and args.audit_command is None:
        print(
            "aforo-sidecar audit: name the tool: `aforo-sidecar audit verify` checks the audit "
            "log's hash chain",
            file=sys.stderr,
        )
        return 2
    if args.command in ("migrate", "reconcile", "audit"):
        try:
            settings = _data_settings(args)
        except SettingsError as exc:
            print(f"aforo-sidecar: configuration error: {exc}", file=sys.stderr)
            return 2
        from sidecar.reconciler.commands import run_data_command

        return run_data_command(args, settings)
    try:
        if args.command == "serve":
            settings = _settings(
                args,
                {
                    "redis_url": args.redis_url,
                    "redis_topology": args.redis_topology,
                    "workers": args.workers,
                    "fail_mode": args.fail_mode,
                    "decision_timeout_ms": args.decision_timeout_ms,
                    "key_prefix": args.key_prefix,
                    "database_url": args.database_url,
                },
            ).check_serving()
        else:
            settings = _settings(args, {"redis_url": ""})
            if settings.admin_token is None:
                settings = msgspec.structs.replace(settings, admin_token=secrets.token_urlsafe(24))
    except SettingsError as exc:
        print(f"aforo-sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    from sidecar.port_check import busy_port

    busy = busy_port(settings)
    if busy is not None:
        print(f"aforo-sidecar: {busy}", file=sys.stderr)
        return 2
    if args.command == "serve":
        _run(settings, args.access_log)
    else:
        _demo(settings, args.access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
