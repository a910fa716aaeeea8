"""``aforo-kong-plugin``: the dedicated kong-pdk plugin server Kong starts for the plugin.

    aforo-kong-plugin -p /usr/local/kong     # start_cmd: listens on <prefix>/aforo-authorize.sock
    aforo-kong-plugin --dump                 # query_cmd: the plugin's info as JSON

Process model: kong-pdk's default threading mode, enforced here (``-m``/``-g`` are
refused). The sidecar client (a gRPC channel) and the usage sender thread live in this
one process and are shared by every request thread; kong_plugin/README.md explains why
gevent and multiprocessing do not fit. Handler threads are kept between events instead
of one started per event (kong_plugin/handler_threads.py).

Python-style PDK results are enforced (``--no-lua-style``): a PDK error raises instead
of returning ``(None, err)``, which the plugin's handlers catch.

On SIGTERM (how Kong stops plugin servers) or when Kong, the parent, goes away, the
server stops, flushes queued usage events for up to 5 s and logs their counters.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from kong_plugin import PLUGIN_NAME, PRIORITY, __version__

REFUSED = {"-m", "--multiprocessing", "-g", "--gevent"}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
log = logging.getLogger("aforo.kong.server")


def _stop(signum: int, frame: FrameType | None) -> None:
    # kong-pdk's serve loop ends cleanly on KeyboardInterrupt only.
    raise KeyboardInterrupt


def _watch_parent(parent: int) -> None:
    """Stop when Kong (the parent) is gone. kong-pdk's own watchdog calls sys.exit()
    from a thread, which ends only that thread."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            log.warning("kong (pid %d) went away; stopping", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    refused = REFUSED.intersection(args)
    if refused:
        print(
            f"aforo-kong-plugin: {', '.join(sorted(refused))} is not supported: the plugin runs "
            "in kong-pdk's threading mode (see kong_plugin/README.md)",
            file=sys.stderr,
        )
        return 2
    if "--no-lua-style" not in args:
        args.append("--no-lua-style")
    dump = "--dump" in args or "-dump" in args
    level = os.environ.get("AFORO_KONG_LOG_LEVEL", "info").upper()
    if level not in LEVELS:
        print(
            f"aforo-kong-plugin: AFORO_KONG_LOG_LEVEL={level!r} is not one of {LEVELS}; using INFO",
            file=sys.stderr,
        )
        level = "INFO"
    logging.basicConfig(
        level=level,
        # Kong reads the plugin server's output into its own log; stderr keeps stdout
        # clean for --dump, whose stdout Kong parses as JSON.
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Heavy imports after the argument check, so a refused invocation fails fast.
    import kong_pdk.cli
    from kong_pdk.cli import start_dedicated_server

    from kong_plugin import client, usage
    from kong_plugin.aforo_authorize import Plugin
    from kong_plugin.handler_threads import PooledPluginServer
    from kong_plugin.schema import SCHEMA

    # start_dedicated_server builds the server class its module names: handler threads
    # kept between events instead of one started per event (handler_threads.py).
    kong_pdk.cli.PluginServer = PooledPluginServer

    sys.argv = [sys.argv[0] if sys.argv else "aforo-kong-plugin", *args]
    if dump:
        start_dedicated_server(PLUGIN_NAME, Plugin, __version__, PRIORITY, SCHEMA)
        return 0  # unreachable: --dump exits
    signal.signal(signal.SIGTERM, _stop)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="aforo-parent", daemon=True).start()
    log.info("aforo-authorize %s plugin server starting (pid %d)", __version__, os.getpid())
    code = 0
    try:
        start_dedicated_server(PLUGIN_NAME, Plugin, __version__, PRIORITY, SCHEMA)
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:  # argparse: bad arguments
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:
        log.exception("plugin server failed")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        usage.shutdown()
        client.close_all()
        log.info("aforo-authorize plugin server stopped")
        logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Request threads of kong-pdk's socket server are not daemons and may sit on idle
    # Kong connections for ever: exit without waiting for them.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
