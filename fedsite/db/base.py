"""PostgreSQL backend: django-prometheus's instrumented one, which replaces a dead connection once.

A pooled connection can die while it sits in the pool (``pg_terminate_backend``, a Postgres restart, a
proxy's idle timeout). Two layers keep that from reaching agents as 500s:

1. the psycopg pool checks every connection on checkout (``CONN_HEALTH_CHECKS = True`` in settings
   makes Django pass ``check=ConnectionPool.check_connection``) and discards a dead one;
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
from collections.abc import Callable
from typing import Any

from django.db.utils import InterfaceError, OperationalError
from django_prometheus.db.backends.postgresql import base as prometheus_base

logger = logging.getLogger("fedsite.db")


class DatabaseWrapper(prometheus_base.DatabaseWrapper):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nothing_executed = False
        self.execute_wrappers.append(self._replace_dead_connection_once)

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
