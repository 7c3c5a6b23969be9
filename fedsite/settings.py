"""Django settings, read from the environment (django-environ) and the seed's config file.

With no ``DATABASE_URL`` / ``REDIS_URL`` the service runs embedded: SQLite, eager Celery and the in-memory
channel layer, so the demo works on a bare machine. With them set it runs on the real stack. Every
variable is listed in ``.env.example``.
"""

from __future__ import annotations

import os
import secrets
import time
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from fedsite.config import ConfigFileError, load_seed_config

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(str(BASE_DIR / ".env"))

try:
    FEDSITE_SEED_CONFIG = load_seed_config()
except ConfigFileError as exc:
    raise ImproperlyConfigured(str(exc)) from exc

VAR_DIR = Path(env.str("FEDSITE_VAR_DIR", default=str(BASE_DIR / "var")))
REDIS_URL = FEDSITE_SEED_CONFIG.redis_url
EMBEDDED = REDIS_URL is None

# DEBUG is off unless asked for (DJANGO_DEBUG=1), in every mode: `make serve` and `make demo` do not ask.
DEBUG = env.bool("DJANGO_DEBUG", default=False)


def _embedded_secret_key(var_dir: Path) -> str:
    """A random key made on first use and kept in ``var/secret_key`` (0600), for the embedded mode only.

    Every process of one installation (server, agents' test servers, management commands) reads the same
    file, so sessions survive restarts; the real stack must be given ``DJANGO_SECRET_KEY`` instead.
    """
    var_dir.mkdir(parents=True, exist_ok=True)
    path = var_dir / "secret_key"
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            key = path.read_text().strip()
            if key:
                return key
            time.sleep(0.02)
        raise ImproperlyConfigured(f"{path} is empty; delete it to have a new key made.") from None
    key = secrets.token_urlsafe(50)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    return key


SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not (EMBEDDED or DEBUG):
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. The real stack (REDIS_URL set) needs it: set it in the "
            "environment or in .env (see .env.example); generate one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(50))'."
        )
    SECRET_KEY = _embedded_secret_key(VAR_DIR)

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# --- HTTPS (production): FEDSITE_HTTPS=1 when browsers and agents reach this server over TLS, directly or
# through a proxy that sets X-Forwarded-Proto. Then cookies are Secure, HSTS is sent and plain HTTP is
# redirected; `manage.py check --deploy` passes with these settings (tested).
FEDSITE_HTTPS = env.bool("FEDSITE_HTTPS", default=False)
if FEDSITE_HTTPS:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=True)
    if env.bool("FEDSITE_BEHIND_PROXY", default=False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc served by the app itself, never from a CDN
    "channels",
    "clients",
    "versioning",
    "trainings",
    "privacy",
    "monitoring",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "fedsite.static.AsyncWhiteNoiseMiddleware",  # WhiteNoise, async-capable (fedsite/static.py)
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "fedsite.urls"
ASGI_APPLICATION = "fedsite.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "fedsite" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'fedsite.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions take the write lock up front, so concurrent writers wait instead of
    # failing with "database is locked" when a read transaction tries to upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    # django-prometheus's backend, plus one replay of a first statement that hit a dead connection
    # (fedsite/db/base.py says when that is safe).
    DATABASES["default"]["ENGINE"] = "fedsite.db"
    # Under ASGI each request runs in its own thread, so CONN_MAX_AGE > 0 piles up idle connections
    # until Postgres refuses new ones; a process-wide psycopg pool reuses them instead.
    if env.int("DATABASE_CONN_MAX_AGE", default=0):
        raise ImproperlyConfigured(
            "DATABASE_CONN_MAX_AGE must be 0 under ASGI; "
            "use DATABASE_POOL_MAX_SIZE to size the connection pool."
        )
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # No pool-level check (an empty query on every checkout): fedsite.db checks each connection it draws
    # by whether its socket has anything to read, and runs that query only then (fedsite/db/base.py).
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False
    pool_size = env.int("DATABASE_POOL_MAX_SIZE", default=16)
    if pool_size > 0:
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 0,
            "max_size": pool_size,
            "timeout": env.float("DATABASE_POOL_TIMEOUT", default=30.0),
        }
DATABASES["default"].setdefault("TEST", {})
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Test on a file, as the embedded mode runs: SQLite's in-memory test database uses a shared cache
    # whose table locks fail concurrent requests ("database table is locked") that WAL serves.
    DATABASES["default"]["TEST"].setdefault("NAME", str(VAR_DIR / "test.sqlite3"))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: broker, cache and channel layer ---------------------------------------------------------
if EMBEDDED:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": env.str("FEDSITE_CHANNEL_PREFIX", default="fedsite")},
        }
    }

# --- Celery -----------------------------------------------------------------------------------------
CELERY_BROKER_URL = REDIS_URL or "memory://"
# Results are only needed to join the chunks of a split aggregation (Celery chords); they expire.
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ALWAYS_EAGER = EMBEDDED
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CONCURRENCY = min(FEDSITE_SEED_CONFIG.cpu_cores, 12)
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    "trainings.aggregate_round": {"queue": "aggregation"},
    "trainings.aggregate_chunk_*": {"queue": "aggregation"},
    "privacy.*": {"queue": "privacy"},
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
FEDSITE_DEADLINE_CHECK_SECONDS = env.float("FEDSITE_DEADLINE_CHECK_SECONDS", default=5.0)
FEDSITE_HEALTH_SAMPLE_SECONDS = env.float("FEDSITE_HEALTH_SAMPLE_SECONDS", default=60.0)
CELERY_BEAT_SCHEDULE = {
    "check-round-deadlines": {
        "task": "trainings.check_deadlines",
        "schedule": FEDSITE_DEADLINE_CHECK_SECONDS,
    },
    "sample-system-health": {
        "task": "monitoring.sample_system_health",
        "schedule": FEDSITE_HEALTH_SAMPLE_SECONDS,
    },
    "collect-garbage": {
        "task": "versioning.collect_garbage",
        "schedule": env.float("FEDSITE_GC_INTERVAL_SECONDS", default=3600.0),
    },
}

# --- Storage of tensors (safetensors blobs addressed by sha256) -------------------------------------
MEDIA_ROOT = Path(env.str("FEDSITE_MEDIA_ROOT", default=str(VAR_DIR / "media")))
MEDIA_URL = "/media/"
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = True  # serve app static files without a collectstatic step
# Browser libraries of the dashboard, installed from the npm registry by `make assets` (package-lock.json
# pins them) and served by the app under /static/vendor/: never fetched from another host at run time.
NODE_MODULES = BASE_DIR / "node_modules"
STATICFILES_DIRS = [
    ("vendor/chart.js", NODE_MODULES / "chart.js" / "dist"),
    ("vendor/chartjs-plugin-zoom", NODE_MODULES / "chartjs-plugin-zoom" / "dist"),
    ("vendor/hammerjs", NODE_MODULES / "hammerjs"),
]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
FILE_UPLOAD_MAX_MEMORY_SIZE = 8 * 1024 * 1024
FEDSITE_MAX_UPDATE_BYTES = env.int("FEDSITE_MAX_UPDATE_BYTES", default=512 * 1024 * 1024)
# Retention and garbage collection (docs/versioning.md, "Retention"; the beat task every GC_INTERVAL).
FEDSITE_UPDATE_BLOB_RETENTION_HOURS = env.float("FEDSITE_UPDATE_BLOB_RETENTION_HOURS", default=24.0)
FEDSITE_BLOB_GRACE_HOURS = env.float("FEDSITE_BLOB_GRACE_HOURS", default=6.0)
FEDSITE_TASK_RETENTION_DAYS = env.float("FEDSITE_TASK_RETENTION_DAYS", default=30.0)
FEDSITE_ENROLLMENT_KEY_RETENTION_DAYS = env.float("FEDSITE_ENROLLMENT_KEY_RETENTION_DAYS", default=30.0)
FEDSITE_OUTBOX_RETENTION_DAYS = env.float("FEDSITE_OUTBOX_RETENTION_DAYS", default=7.0)
for _name, _value in (
    ("FEDSITE_UPDATE_BLOB_RETENTION_HOURS", FEDSITE_UPDATE_BLOB_RETENTION_HOURS),
    ("FEDSITE_BLOB_GRACE_HOURS", FEDSITE_BLOB_GRACE_HOURS),
    ("FEDSITE_TASK_RETENTION_DAYS", FEDSITE_TASK_RETENTION_DAYS),
    ("FEDSITE_ENROLLMENT_KEY_RETENTION_DAYS", FEDSITE_ENROLLMENT_KEY_RETENTION_DAYS),
    ("FEDSITE_OUTBOX_RETENTION_DAYS", FEDSITE_OUTBOX_RETENTION_DAYS),
):
    if not 0 <= _value < 1e6:
        raise ImproperlyConfigured(f"{_name} must be a number at least 0. Found {_value}.")
if FEDSITE_BLOB_GRACE_HOURS < 0.05:  # a writer names its blob seconds after storing it: leave it time
    raise ImproperlyConfigured(
        f"FEDSITE_BLOB_GRACE_HOURS must be at least 0.05 (3 minutes). Found {FEDSITE_BLOB_GRACE_HOURS}."
    )

# --- Request limits (see fedsite/limits.py and docs/agent-protocol.md, "Limits") -------------------
# Every endpoint has its own body limit, checked against Content-Length before anything is read and
# counted while a body streams in; only the update upload takes FEDSITE_MAX_UPDATE_BYTES.
FEDSITE_MAX_JSON_BODY_BYTES = env.int("FEDSITE_MAX_JSON_BODY_BYTES", default=64 * 1024)
FEDSITE_MAX_FORM_BODY_BYTES = env.int("FEDSITE_MAX_FORM_BODY_BYTES", default=1024 * 1024)
FEDSITE_MAX_JSON_DEPTH = env.int("FEDSITE_MAX_JSON_DEPTH", default=32)
FEDSITE_MAX_HEADER_BYTES = env.int("FEDSITE_MAX_HEADER_BYTES", default=32 * 1024)
FEDSITE_HEADER_TIMEOUT = env.float("FEDSITE_HEADER_TIMEOUT", default=10.0)
FEDSITE_BODY_IDLE_TIMEOUT = env.float("FEDSITE_BODY_IDLE_TIMEOUT", default=15.0)
FEDSITE_BODY_TIMEOUT = env.float("FEDSITE_BODY_TIMEOUT", default=30.0)
FEDSITE_UPLOAD_TIMEOUT = env.float("FEDSITE_UPLOAD_TIMEOUT", default=600.0)
FEDSITE_KEEP_ALIVE_TIMEOUT = env.float("FEDSITE_KEEP_ALIVE_TIMEOUT", default=5.0)
# Connections the kernel queues for `serve` before it accepts them (listen(2)'s backlog; Linux caps it at
# net.core.somaxconn). Thousands of agents (re)connecting at once overflow a short queue: the kernel drops
# their handshakes and a client's first request is then reset (uvicorn's default is 2048).
FEDSITE_LISTEN_BACKLOG = env.int("FEDSITE_LISTEN_BACKLOG", default=16384)
# Django's own cap on bodies it reads into memory (request.body, non-file multipart fields, admin forms).
DATA_UPLOAD_MAX_MEMORY_SIZE = FEDSITE_MAX_FORM_BODY_BYTES

# --- Federation ------------------------------------------------------------------------------------
FEDSITE_MAX_CONCURRENT_TRAININGS = FEDSITE_SEED_CONFIG.max_concurrent_trainings
FEDSITE_MIN_CLIENTS_PER_ROUND = FEDSITE_SEED_CONFIG.min_clients_per_round
FEDSITE_MAX_CLIENTS_PER_ROUND = FEDSITE_SEED_CONFIG.max_clients_per_round
FEDSITE_DEFAULT_PRIVACY_LEVEL = FEDSITE_SEED_CONFIG.default_privacy_level
FEDSITE_DASHBOARD_PORT = FEDSITE_SEED_CONFIG.dashboard_port
FEDSITE_CPU_CORES = FEDSITE_SEED_CONFIG.cpu_cores
FEDSITE_HEARTBEAT_INTERVAL = env.int("FEDSITE_HEARTBEAT_INTERVAL", default=15)
FEDSITE_AGENT_TIMEOUT = env.int("FEDSITE_AGENT_TIMEOUT", default=90)
# Seconds an agent token, once looked up, is trusted without a query in each process (0: off). A disabled
# agent is refused within this time in every process (at once in the one that disabled it).
FEDSITE_AGENT_TOKEN_CACHE_SECONDS = env.float("FEDSITE_AGENT_TOKEN_CACHE_SECONDS", default=5.0)
# Seconds within which a poll or bare heartbeat does not write last_seen_at again when this process wrote
# it for the agent (0: every poll writes); last_seen_at is then at most this far behind.
FEDSITE_AGENT_SEEN_WRITE_SECONDS = env.float("FEDSITE_AGENT_SEEN_WRITE_SECONDS", default=15.0)
FEDSITE_LONG_POLL_MAX = env.int("FEDSITE_LONG_POLL_MAX", default=60)
# A long-poll with no task is answered 204 after a random time between (1 - this) * wait and wait, so that
# agents that (re)connected together (a server restart, a network blip) spread out instead of coming back
# in the same second every wait seconds (0: exactly wait).
FEDSITE_LONG_POLL_JITTER = env.float("FEDSITE_LONG_POLL_JITTER", default=0.2)
if not 0 <= FEDSITE_LONG_POLL_JITTER < 1:
    raise ImproperlyConfigured(
        f"FEDSITE_LONG_POLL_JITTER must be at least 0 and below 1; it is {FEDSITE_LONG_POLL_JITTER}."
    )
FEDSITE_ROUND_TIMEOUT = env.float("FEDSITE_ROUND_TIMEOUT", default=300.0)
FEDSITE_MAX_ROUND_ATTEMPTS = env.int("FEDSITE_MAX_ROUND_ATTEMPTS", default=5)
FEDSITE_ENROLLMENT_KEY = env.str("FEDSITE_ENROLLMENT_KEY", default="")
# Robust rules (Krum, median, trimmed mean) on rounds whose updates exceed this many bytes are split into
# coordinate chunks aggregated by parallel Celery tasks; below it one worker combines them in process.
FEDSITE_CHUNKED_AGGREGATION_BYTES = env.int("FEDSITE_CHUNKED_AGGREGATION_BYTES", default=256 * 1024 * 1024)
# Faults and recovery (docs/operations.md): a running aggregation heartbeats on its outbox row every
# HEARTBEAT seconds; one with no sign of life for STALL seconds is sent to a worker again (idempotent)
# and raises an aggregation_stalled alert. Detection takes at most STALL + FEDSITE_DEADLINE_CHECK_SECONDS.
FEDSITE_AGGREGATION_HEARTBEAT_SECONDS = env.float("FEDSITE_AGGREGATION_HEARTBEAT_SECONDS", default=10.0)
FEDSITE_AGGREGATION_STALL_SECONDS = env.float("FEDSITE_AGGREGATION_STALL_SECONDS", default=45.0)
if not 0 < 2 * FEDSITE_AGGREGATION_HEARTBEAT_SECONDS <= FEDSITE_AGGREGATION_STALL_SECONDS:
    raise ImproperlyConfigured(
        "FEDSITE_AGGREGATION_STALL_SECONDS must be at least twice FEDSITE_AGGREGATION_HEARTBEAT_SECONDS "
        f"(and both positive), or a healthy aggregation is re-sent. Found heartbeat "
        f"{FEDSITE_AGGREGATION_HEARTBEAT_SECONDS} and stall {FEDSITE_AGGREGATION_STALL_SECONDS}."
    )
# Fault drills only: every aggregation task waits this many seconds (heartbeating) before it combines,
# so a worker can be killed mid-aggregation on purpose. Default 0.
FEDSITE_AGGREGATION_DRILL_DELAY_SECONDS = env.float("FEDSITE_AGGREGATION_DRILL_DELAY_SECONDS", default=0.0)
# A round whose agents let more than this fraction of its tasks expire raises an agents_dropping alert.
FEDSITE_DROPOUT_ALERT_FRACTION = env.float("FEDSITE_DROPOUT_ALERT_FRACTION", default=0.2)
if not 0 <= FEDSITE_DROPOUT_ALERT_FRACTION < 1:
    raise ImproperlyConfigured(
        f"FEDSITE_DROPOUT_ALERT_FRACTION must be in [0, 1). Found {FEDSITE_DROPOUT_ALERT_FRACTION}."
    )
FEDSITE_PUBLIC_BASE_URL = env.str("FEDSITE_PUBLIC_BASE_URL", default="")

# --- System health and alerts (docs/monitoring.md) ----------------------------------------------------
# Every FEDSITE_HEALTH_SAMPLE_SECONDS a worker samples the machine (CPU measured over CPU_INTERVAL seconds),
# keeps at most MAX_SAMPLES samples and none older than RETENTION_HOURS.
FEDSITE_HEALTH_CPU_INTERVAL_SECONDS = env.float("FEDSITE_HEALTH_CPU_INTERVAL_SECONDS", default=1.0)
FEDSITE_HEALTH_WORKER_PING_SECONDS = env.float("FEDSITE_HEALTH_WORKER_PING_SECONDS", default=1.0)
FEDSITE_HEALTH_RETENTION_HOURS = env.float("FEDSITE_HEALTH_RETENTION_HOURS", default=168.0)
FEDSITE_HEALTH_MAX_SAMPLES = env.int("FEDSITE_HEALTH_MAX_SAMPLES", default=50_000)
FEDSITE_HEALTH_QUEUES = env.list("FEDSITE_HEALTH_QUEUES", default=["aggregation", "privacy", "default"])
for _name, _value in (
    ("FEDSITE_HEALTH_SAMPLE_SECONDS", FEDSITE_HEALTH_SAMPLE_SECONDS),
    ("FEDSITE_HEALTH_CPU_INTERVAL_SECONDS", FEDSITE_HEALTH_CPU_INTERVAL_SECONDS),
    ("FEDSITE_HEALTH_RETENTION_HOURS", FEDSITE_HEALTH_RETENTION_HOURS),
    ("FEDSITE_HEALTH_MAX_SAMPLES", FEDSITE_HEALTH_MAX_SAMPLES),
):
    if not _value > 0:
        raise ImproperlyConfigured(f"{_name} must be positive. Found {_value}.")
# resource_exhausted: a figure past its threshold in every sample for SUSTAINED_SECONDS.
FEDSITE_ALERT_CPU_PERCENT = env.float("FEDSITE_ALERT_CPU_PERCENT", default=95.0)
FEDSITE_ALERT_MEMORY_PERCENT = env.float("FEDSITE_ALERT_MEMORY_PERCENT", default=90.0)
FEDSITE_ALERT_DISK_FREE_PERCENT = env.float("FEDSITE_ALERT_DISK_FREE_PERCENT", default=5.0)
FEDSITE_ALERT_QUEUE_DEPTH = env.int("FEDSITE_ALERT_QUEUE_DEPTH", default=100)
FEDSITE_ALERT_SUSTAINED_SECONDS = env.float("FEDSITE_ALERT_SUSTAINED_SECONDS", default=300.0)
# performance_degraded and convergence_stalled, evaluated on these metrics whenever a round's are stored.
FEDSITE_ALERT_METRICS = env.list(
    "FEDSITE_ALERT_METRICS", default=["accuracy", "federated_accuracy", "loss", "federated_loss"]
)
FEDSITE_ALERT_DEGRADATION_FRACTION = env.float("FEDSITE_ALERT_DEGRADATION_FRACTION", default=0.1)
FEDSITE_ALERT_DEGRADATION_WINDOW = env.int("FEDSITE_ALERT_DEGRADATION_WINDOW", default=10)
FEDSITE_ALERT_STALL_ROUNDS = env.int("FEDSITE_ALERT_STALL_ROUNDS", default=10)
FEDSITE_ALERT_STALL_MIN_DELTA = env.float("FEDSITE_ALERT_STALL_MIN_DELTA", default=0.001)
# Convergence status of GET training progress: the trend of the last WINDOW values, flat within TOLERANCE.
FEDSITE_CONVERGENCE_WINDOW = env.int("FEDSITE_CONVERGENCE_WINDOW", default=5)
FEDSITE_CONVERGENCE_TOLERANCE = env.float("FEDSITE_CONVERGENCE_TOLERANCE", default=0.001)
# Anomaly detection on updates (monitoring/anomalies.py); a training's "anomaly" block overrides these.
FEDSITE_ANOMALY_DETECTION = env.bool("FEDSITE_ANOMALY_DETECTION", default=True)
FEDSITE_ANOMALY_THRESHOLD = env.float("FEDSITE_ANOMALY_THRESHOLD", default=3.5)
FEDSITE_ANOMALY_MIN_UPDATES = env.int("FEDSITE_ANOMALY_MIN_UPDATES", default=5)
FEDSITE_ANOMALY_ACTION = env.str("FEDSITE_ANOMALY_ACTION", default="flag")
if FEDSITE_ANOMALY_ACTION not in ("flag", "exclude"):
    raise ImproperlyConfigured(
        f"FEDSITE_ANOMALY_ACTION must be flag or exclude. Found {FEDSITE_ANOMALY_ACTION!r}."
    )
# Floor of the z-scores' spread: cosine units for the cosine, a fraction of the median for norms and losses.
FEDSITE_ANOMALY_MIN_SPREAD = env.float("FEDSITE_ANOMALY_MIN_SPREAD", default=0.1)
# Contribution: running cosine estimator r <- decay * r + (1 - decay) * psi (Xu et al. 2021).
FEDSITE_CONTRIBUTION_DECAY = env.float("FEDSITE_CONTRIBUTION_DECAY", default=0.8)
# selection "reliability": weight = reliability * ((1 - W) + W * max(contribution, 0)), W in [0, 1].
FEDSITE_SELECTION_CONTRIBUTION_WEIGHT = env.float("FEDSITE_SELECTION_CONTRIBUTION_WEIGHT", default=0.5)
# client_failures: an agent's failed + expired share of its last WINDOW finished tasks >= RATE, once it has
# at least MIN_TASKS finished tasks.
FEDSITE_ALERT_CLIENT_FAILURE_WINDOW = env.int("FEDSITE_ALERT_CLIENT_FAILURE_WINDOW", default=10)
FEDSITE_ALERT_CLIENT_FAILURE_RATE = env.float("FEDSITE_ALERT_CLIENT_FAILURE_RATE", default=0.5)
FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS = env.int("FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS", default=4)
if not FEDSITE_ANOMALY_THRESHOLD > 0:
    raise ImproperlyConfigured(
        f"FEDSITE_ANOMALY_THRESHOLD must be positive. Found {FEDSITE_ANOMALY_THRESHOLD}."
    )
if FEDSITE_ANOMALY_MIN_SPREAD < 0:
    raise ImproperlyConfigured(
        f"FEDSITE_ANOMALY_MIN_SPREAD must be at least 0. Found {FEDSITE_ANOMALY_MIN_SPREAD}."
    )
if FEDSITE_ANOMALY_MIN_UPDATES < 3:
    raise ImproperlyConfigured(
        f"FEDSITE_ANOMALY_MIN_UPDATES must be at least 3. Found {FEDSITE_ANOMALY_MIN_UPDATES}."
    )
for _name, _value in (
    ("FEDSITE_CONTRIBUTION_DECAY", FEDSITE_CONTRIBUTION_DECAY),
    ("FEDSITE_SELECTION_CONTRIBUTION_WEIGHT", FEDSITE_SELECTION_CONTRIBUTION_WEIGHT),
):
    if not 0 <= _value <= 1:
        raise ImproperlyConfigured(f"{_name} must be in [0, 1]. Found {_value}.")
if not 0 < FEDSITE_ALERT_CLIENT_FAILURE_RATE <= 1:
    raise ImproperlyConfigured(
        f"FEDSITE_ALERT_CLIENT_FAILURE_RATE must be in (0, 1]. Found {FEDSITE_ALERT_CLIENT_FAILURE_RATE}."
    )
if not 1 <= FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS <= FEDSITE_ALERT_CLIENT_FAILURE_WINDOW:
    raise ImproperlyConfigured(
        "FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS must be between 1 and FEDSITE_ALERT_CLIENT_FAILURE_WINDOW. "
        f"Found {FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS}."
    )
for _name, _value in (
    ("FEDSITE_ALERT_DEGRADATION_WINDOW", FEDSITE_ALERT_DEGRADATION_WINDOW),
    ("FEDSITE_ALERT_STALL_ROUNDS", FEDSITE_ALERT_STALL_ROUNDS),
    ("FEDSITE_CONVERGENCE_WINDOW", FEDSITE_CONVERGENCE_WINDOW),
):
    if _value < 2:
        raise ImproperlyConfigured(f"{_name} must be at least 2 rounds. Found {_value}.")
if not 0 < FEDSITE_ALERT_DEGRADATION_FRACTION < 1:
    raise ImproperlyConfigured(
        f"FEDSITE_ALERT_DEGRADATION_FRACTION must be in (0, 1). Found {FEDSITE_ALERT_DEGRADATION_FRACTION}."
    )

# --- REST API --------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # operators: knox tokens (hashed, prefixed, expiring) as "Authorization: Token fso_...". First, so
        # a refused request is a 401 with "WWW-Authenticate: Token" (DRF asks the first class for it).
        "fedsite.operator_auth.OperatorTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Proxies in front of the server that append to X-Forwarded-For. 0 (the default) trusts only the
    # socket's address, so a client cannot pick the IP its failed logins are counted against.
    "NUM_PROXIES": env.int("FEDSITE_NUM_PROXIES", default=0),
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "fedsite.api.exception_handler",
    # One JSON parser for the whole API: size, depth, NUL and lone-surrogate checks (fedsite/parsers.py).
    # Forms stay parsed for the dashboard's session-authenticated posts (CSRF reads request.POST); the
    # agent protocol's views take JSON only.
    "DEFAULT_PARSER_CLASSES": [
        "fedsite.parsers.StrictJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "fedsite API",
    "DESCRIPTION": "Operator and agent API of the fedsite federated-learning coordination service. "
    "The agent protocol is described in docs/agent-protocol.md.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "/api/redoc-dist",  # fedsite.api_docs: the sidecar's bundle, without its CDN logo
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"PrivacyLevelEnum": "trainings.api.serializers.PRIVACY_LEVEL_CHOICES"},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "trainings.api.agent_views.add_next_task_path",
        "fedsite.openapi.add_error_responses",
    ],
}

# --- Authentication hardening: operator tokens, failed-auth throttling, admin lockout, /metrics ------
# Kept in one block (see docs/operations.md, "Authentication").
INSTALLED_APPS += ["knox", "axes"]
# AxesMiddleware last, as django-axes asks: it turns a lockout flagged by the backend into the response.
MIDDLEWARE += ["axes.middleware.AxesMiddleware"]
# django-axes' backend first: it refuses a locked-out login before the password is checked. It has no
# get_user(), so the test client's force_login() skips it and uses ModelBackend; it lets logins without a
# request (the test client's login(), a shell) through to ModelBackend (fedsite.throttling).
AUTHENTICATION_BACKENDS = [
    "fedsite.throttling.LoginLockoutBackend",
    "django.contrib.auth.backends.ModelBackend",
]

_operator_token_ttl_days = env.float("FEDSITE_OPERATOR_TOKEN_TTL_DAYS", default=30.0)
REST_KNOX = {
    "TOKEN_PREFIX": "fso_",  # operator tokens; agent tokens start with fsa_ (clients/services.py)
    "AUTH_HEADER_PREFIX": "Token",  # agents use "Bearer": the two schemes never read each other's header
    "TOKEN_TTL": timedelta(days=_operator_token_ttl_days) if _operator_token_ttl_days > 0 else None,
    "AUTO_REFRESH": False,
}

# Failed authentications counted per client IP in the cache, as DRF rates "N/s|m|h|d". Past N failures in
# the period, every attempt of that kind from the IP gets 429 with Retry-After until the window moves on.
FEDSITE_AUTH_FAILURE_RATES = {
    "agent_token": env.str("FEDSITE_THROTTLE_AGENT_TOKEN", default="10/m"),
    "operator_token": env.str("FEDSITE_THROTTLE_OPERATOR_TOKEN", default="10/m"),
    "enrollment": env.str("FEDSITE_THROTTLE_ENROLLMENT", default="10/m"),
    "metrics_token": env.str("FEDSITE_THROTTLE_METRICS_TOKEN", default="10/m"),
}
for _scope, _rate in FEDSITE_AUTH_FAILURE_RATES.items():
    _count, _, _period = _rate.partition("/")
    if not (_count.isdigit() and int(_count) >= 1 and _period[:1] in ("s", "m", "h", "d")):
        raise ImproperlyConfigured(
            f"FEDSITE_THROTTLE_{_scope.upper()} must be a rate N/s, N/m, N/h or N/d with N >= 1 "
            f"(failures allowed per period). Found {_rate!r}."
        )
# Part of the counters' cache keys; the test suite sets a fresh one per test.
FEDSITE_AUTH_FAILURE_NAMESPACE = env.str("FEDSITE_AUTH_FAILURE_NAMESPACE", default="v1")

# django-axes: admin (and any Django) login failures, per username and IP, stored in the database.
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_FAILURE_LIMIT = env.int("FEDSITE_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("FEDSITE_LOGIN_COOLOFF_MINUTES", default=15.0))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
AXES_CLIENT_IP_CALLABLE = "fedsite.throttling.login_client_ip"
AXES_LOCKOUT_CALLABLE = "fedsite.throttling.login_lockout_response"

# /metrics: a staff session, or "Authorization: Bearer <FEDSITE_METRICS_TOKEN>" (compared in constant
# time). Anonymous scrapes only when FEDSITE_METRICS_ALLOW_ANONYMOUS is set.
FEDSITE_METRICS_TOKEN = env.str("FEDSITE_METRICS_TOKEN", default="")
FEDSITE_METRICS_ALLOW_ANONYMOUS = env.bool("FEDSITE_METRICS_ALLOW_ANONYMOUS", default=False)

# WebSocket frames larger than this are refused (error frame, then close 1009).
FEDSITE_WS_MAX_FRAME_BYTES = env.int("FEDSITE_WS_MAX_FRAME_BYTES", default=64 * 1024)

LOGIN_URL = "/admin/login/"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

LOG_LEVEL = env.str("FEDSITE_LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "structured": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "structured"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "fedsite": {"level": LOG_LEVEL},
        "trainings": {"level": LOG_LEVEL},
        "clients": {"level": LOG_LEVEL},
        "versioning": {"level": LOG_LEVEL},
        "monitoring": {"level": LOG_LEVEL},
        "privacy": {"level": LOG_LEVEL},
    },
}
