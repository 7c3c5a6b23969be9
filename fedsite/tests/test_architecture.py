"""Rule of direction (DESIGN.md section 2): flcore and fedagent import no Django and no app."""

from __future__ import annotations

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
