"""Rule of direction (DESIGN.md section 2): flcore and fedagent import no Django and no app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken" in result.stdout


def test_openapi_schema_documents_the_agent_protocol(admin_client) -> None:  # type: ignore[no-untyped-def]
    response = admin_client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    import json

    schema = json.loads(response.content)
    paths = schema["paths"]
    for path in (
        "/api/v1/agent/enroll",
        "/api/v1/agent/heartbeat",
        "/api/v1/agent/tasks/next",
        "/api/v1/agent/tasks/{task_id}/update",
        "/api/v1/agent/models/{version_id}",
        "/api/training/start",
        "/api/training/{training_id}/status",
        "/api/alerts",
    ):
        assert path in paths, path
    assert "agentToken" in schema["components"]["securitySchemes"]
    assert admin_client.get("/api/docs/").status_code == 200


def test_a_server_process_starts_without_loading_the_privacy_accountant() -> None:
    """dp-accounting and SciPy cost every web and worker process about a second of its start (more on a
    loaded machine); only a training with a privacy budget needs them, so they load on first use."""
    code = (
        "import os, sys, django\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'fedsite.settings')\n"
        "django.setup()\n"
        "import fedsite.asgi, fedsite.celery, trainings.services, privacy.services\n"
        "print(sorted(m for m in ('dp_accounting', 'scipy') if m in sys.modules))\n"
        "from privacy.services import budget_allows\n"
        "import privacy.accounting\n"
        "print(sorted(m for m in ('dp_accounting', 'scipy') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    at_start, after_use = result.stdout.split("\n")[:2]
    assert at_start == "[]", result.stdout
    assert after_use == "['dp_accounting', 'scipy']", result.stdout  # and they do load when used
