"""fedsite's PostgreSQL backend (``ENGINE = "fedsite.db"``): django-prometheus's, repairing stale connections.

See :mod:`fedsite.db.base`.
"""
