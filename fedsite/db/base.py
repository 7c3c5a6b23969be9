"""PostgreSQL backend: django-prometheus's instrumented one, which replaces a dead connection once.

A pooled connection can die while it sits in the pool (``pg_terminate_backend``, a Postgres restart, a
proxy's idle timeout). Two layers keep that from reaching agents as 500s:

1. every connection drawn from the pool is checked (:meth:`DatabaseWrapper.get_new_connection`) and a
   dead one is discarded. The check costs a round trip only when the connection's socket has something
   to read or its state is not idle: a backend that was terminated, restarted or cut off by a proxy
   sends an error and closes its socket, which makes it readable, while a healthy idle connection has
   nothing to say. (The pool's own check, ``CONN_HEALTH_CHECKS = True``, ran an empty query on every
   checkout: 14% of the server's CPU in a round of 50 agents, docs/benchmarks.md 2f.) A connection that
   died silently, without a packet, passes the first layer and is caught by the second;
2. this wrapper covers the gap between that check and the first statement: when the *first* statement
   run on a freshly checked-out connection fails because the connection is dead, it takes another
   connection and runs the statement again, once.

Invariant (why the retry is safe): it happens only when nothing has been executed on the connection
since checkout and no transaction is open, so the failed statement is the only thing the dead
connection could have lost and Postgres rolled it back with the session. A statement that fails later
in a request, or inside ``atomic()``, is never replayed: earlier work of the request might be lost or
half-done, and only the caller can decide.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from django.db.utils import InterfaceError, OperationalError
from django_prometheus.db.backends.postgresql import base as prometheus_base
from psycopg import pq
from psycopg_pool import ConnectionPool

logger = logging.getLogger("fedsite.db")


def _quiet_and_idle(conn: Any) -> bool:
    """Whether a pooled connection looks alive without a round trip: open, idle, nothing to read."""
    if conn.closed or conn.info.transaction_status != pq.TransactionStatus.IDLE:
        return False
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


def _alive(conn: Any) -> bool:
    """The psycopg pool's own check (an empty query), as a boolean."""
    try:
        ConnectionPool.check_connection(conn)
    except Exception:  # psycopg.Error, or an OSError from the socket: dead either way
        return False
    return True


class DatabaseWrapper(prometheus_base.DatabaseWrapper):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nothing_executed = False
        self.execute_wrappers.append(self._replace_dead_connection_once)

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        """Draw a connection (from the pool when there is one) and make sure it is not a dead one."""
        conn = super().get_new_connection(conn_params)
        if self.pool is None:
            return conn
        # Every pooled connection may be dead (a Postgres restart): after max_size discards the pool has
        # had to open a new one, so the last draw is fresh.
        for _ in range(self.pool.max_size):
            if _quiet_and_idle(conn) or _alive(conn):
                return conn
            logger.warning("dead_pooled_connection_discarded alias=%s", self.alias)
            with suppress(Exception):
                conn.close()
            self.pool.putconn(conn)  # a closed connection handed back is dropped, not pooled
            conn = super().get_new_connection(conn_params)
        return conn

    def connect(self) -> None:
        super().connect()
        self._nothing_executed = True

    def _connection_is_dead(self) -> bool:
        return self.connection is None or bool(self.connection.closed)

    def _replace_dead_connection_once(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        first, self._nothing_executed = self._nothing_executed, False
        try:
            return execute(sql, params, many, context)
        except (OperationalError, InterfaceError) as exc:
            cursor = context["cursor"]
            if (
                not first
                or self.in_atomic_block
                or getattr(cursor.cursor, "name", None)  # a server-side cursor: let the caller retry
                or not self._connection_is_dead()
            ):
                raise
            logger.warning("stale_connection_replaced alias=%s error=%s", self.alias, str(exc).strip())
            self.close()
            self.ensure_connection()
            self._nothing_executed = False
            cursor.cursor = self.create_cursor()
            return execute(sql, params, many, context)
