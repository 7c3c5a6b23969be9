"""``manage.py serve``: the ASGI application (HTTP and WebSockets) under uvicorn, in one process.

In embedded mode (no ``REDIS_URL``) there is no Celery beat, so a daemon thread here does beat's job
of checking round deadlines every ``FEDSITE_DEADLINE_CHECK_SECONDS``. SIGINT and SIGTERM shut down
gracefully (open requests get ``--graceful-timeout`` seconds) and the command exits 0; waiting long-polls
do not use that period: the signal sets ``trainings.wakeup.shutdown`` and they are answered at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import close_old_connections

logger = logging.getLogger("trainings.serve")


def deadline_loop(stop: threading.Event, interval: float) -> None:
    """Call ``rounds_check_deadlines`` every ``interval`` seconds until ``stop`` is set."""
    from trainings.services import rounds_check_deadlines

    while not stop.wait(interval):
        try:
            summary = rounds_check_deadlines()
            if any(summary.values()):
                logger.info("deadline_check %s", " ".join(f"{k}={v}" for k, v in sorted(summary.items())))
        except Exception:  # one failed tick must not end the loop; the next tick retries
            logger.exception("deadline_check_failed")
        finally:
            close_old_connections()


def _server_class(base: type[Any]) -> type[Any]:
    """uvicorn's Server, also telling the long-polls of this process when a shutdown signal arrives."""
    from trainings.wakeup import shutdown

    class Server(base):  # type: ignore[misc, valid-type]
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            shutdown.set()
            super().handle_exit(sig, frame)

    return Server


class Command(BaseCommand):
    help = (
        "Serve fedsite (REST API, agent protocol, dashboard, WebSockets) with uvicorn. In embedded mode "
        "it also checks round deadlines, which Celery beat does on the real stack."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
        parser.add_argument(
            "--port",
            type=int,
            default=None,
            help="TCP port (default: settings.FEDSITE_DASHBOARD_PORT, the seed's dashboard_port)",
        )
        parser.add_argument(
            "--graceful-timeout",
            type=float,
            default=10.0,
            help="seconds open connections get to finish on shutdown (default 10)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        import uvicorn

        from fedsite.http_protocol import HeaderDeadlineH11Protocol

        port = options["port"] or settings.FEDSITE_DASHBOARD_PORT
        # h11 (not httptools) so request headers get a deadline and a size limit; bodies are limited by
        # fedsite.limits, wrapped around the application in fedsite/asgi.py.
        protocol = type(
            "FedsiteH11Protocol",
            (HeaderDeadlineH11Protocol,),
            {"header_timeout": float(settings.FEDSITE_HEADER_TIMEOUT)},
        )
        config = uvicorn.Config(
            "fedsite.asgi:application",
            host=options["host"],
            port=port,
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=max(1, round(options["graceful_timeout"])),
            http=protocol,
            h11_max_incomplete_event_size=settings.FEDSITE_MAX_HEADER_BYTES,
            timeout_keep_alive=settings.FEDSITE_KEEP_ALIVE_TIMEOUT,
            backlog=settings.FEDSITE_LISTEN_BACKLOG,
        )
        server = _server_class(uvicorn.Server)(config)

        stop = threading.Event()
        thread = None
        if settings.EMBEDDED:
            interval = float(settings.FEDSITE_DEADLINE_CHECK_SECONDS)
            thread = threading.Thread(
                target=deadline_loop, args=(stop, interval), name="deadline-check", daemon=True
            )
            thread.start()

        # uvicorn captures SIGINT/SIGTERM, shuts down, restores the handlers found here and re-raises the
        # signal: these handlers make that re-raise a no-op, so the command ends normally with exit 0.
        received: list[int] = []

        def remember(signum: int, frame: FrameType | None) -> None:
            received.append(signum)

        previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
        mode = (
            "embedded stack: SQLite, eager Celery, deadline checks in this process"
            if settings.EMBEDDED
            else "real stack"
        )
        self.stdout.write(f"fedsite serving on http://{options['host']}:{port}/ ({mode})")
        self.stdout.flush()
        try:
            server.run()
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=5.0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started and not received:
            raise SystemExit(f"The server could not start on {options['host']}:{port} (see the error above).")
        self.stdout.write("fedsite server stopped")
