"""Django settings, read from the environment (django-environ) and the seed's config file.

With no ``DATABASE_URL`` / ``REDIS_URL`` the service runs embedded: SQLite, eager Celery and the in-memory
channel layer, so the demo works on a bare machine. With them set it runs on the real stack. Every
variable is listed in ``.env.example``.
"""

from __future__ import annotations

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

DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Set it in the environment or in .env (see .env.example); "
            "for local development DJANGO_DEBUG=1 allows a built-in insecure key."
        )
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"  # noqa: S105

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
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
    "whitenoise.middleware.WhiteNoiseMiddleware",
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
VAR_DIR = Path(env.str("FEDSITE_VAR_DIR", default=str(BASE_DIR / "var")))
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
    DATABASES["default"]["ENGINE"] = "django_prometheus.db.backends.postgresql"
    # Under ASGI each request runs in its own thread, so CONN_MAX_AGE > 0 piles up idle connections
    # until Postgres refuses new ones; a process-wide psycopg pool reuses them instead.
    if env.int("DATABASE_CONN_MAX_AGE", default=0):
        raise ImproperlyConfigured(
            "DATABASE_CONN_MAX_AGE must be 0 under ASGI; "
            "use DATABASE_POOL_MAX_SIZE to size the connection pool."
        )
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    pool_size = env.int("DATABASE_POOL_MAX_SIZE", default=16)
    if pool_size > 0:
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 0,
            "max_size": pool_size,
            "timeout": env.float("DATABASE_POOL_TIMEOUT", default=30.0),
        }
DATABASES["default"].setdefault("TEST", {})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: broker, cache and channel layer ---------------------------------------------------------
REDIS_URL = FEDSITE_SEED_CONFIG.redis_url
EMBEDDED = REDIS_URL is None

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
CELERY_BEAT_SCHEDULE = {
    "check-round-deadlines": {
        "task": "trainings.check_deadlines",
        "schedule": FEDSITE_DEADLINE_CHECK_SECONDS,
    },
    "sample-system-health": {
        "task": "monitoring.sample_system_health",
        "schedule": env.float("FEDSITE_HEALTH_SAMPLE_SECONDS", default=60.0),
    },
}

# --- Storage of tensors (safetensors blobs addressed by sha256) -------------------------------------
MEDIA_ROOT = Path(env.str("FEDSITE_MEDIA_ROOT", default=str(VAR_DIR / "media")))
MEDIA_URL = "/media/"
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = True  # serve app static files without a collectstatic step
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
FILE_UPLOAD_MAX_MEMORY_SIZE = 8 * 1024 * 1024
FEDSITE_MAX_UPDATE_BYTES = env.int("FEDSITE_MAX_UPDATE_BYTES", default=512 * 1024 * 1024)

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
FEDSITE_LONG_POLL_MAX = env.int("FEDSITE_LONG_POLL_MAX", default=60)
FEDSITE_ROUND_TIMEOUT = env.float("FEDSITE_ROUND_TIMEOUT", default=300.0)
FEDSITE_MAX_ROUND_ATTEMPTS = env.int("FEDSITE_MAX_ROUND_ATTEMPTS", default=5)
FEDSITE_ENROLLMENT_KEY = env.str("FEDSITE_ENROLLMENT_KEY", default="")
# Robust rules (Krum, median, trimmed mean) on rounds whose updates exceed this many bytes are split into
# coordinate chunks aggregated by parallel Celery tasks; below it one worker combines them in process.
FEDSITE_CHUNKED_AGGREGATION_BYTES = env.int("FEDSITE_CHUNKED_AGGREGATION_BYTES", default=256 * 1024 * 1024)
# An aggregation still running this long after its round closed is enqueued again (idempotent).
FEDSITE_AGGREGATION_STALL_SECONDS = env.int("FEDSITE_AGGREGATION_STALL_SECONDS", default=900)
FEDSITE_PUBLIC_BASE_URL = env.str("FEDSITE_PUBLIC_BASE_URL", default="")

# --- REST API --------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
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
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "trainings.api.agent_views.add_next_task_path",
    ],
}

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
