"""Production settings pass ``check --deploy``; DEBUG is off unless asked; the embedded mode needs no key.

Each case starts a fresh ``manage.py`` process, because settings are read once per process from the
environment.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _manage(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _base_env(tmp_path: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "FEDSITE_")) and key not in {"DATABASE_URL", "REDIS_URL"}
    }
    env["FEDSITE_VAR_DIR"] = str(tmp_path / "var")
    return env


def _production_env(tmp_path: Path) -> dict[str, str]:
    return {
        **_base_env(tmp_path),
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/fedsite",
        "REDIS_URL": "redis://127.0.0.1:6379/9",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "fl.example.org",
        "FEDSITE_HTTPS": "1",
        "FEDSITE_BEHIND_PROXY": "1",
    }


PRINT_DEBUG = "from django.conf import settings; print('DEBUG', settings.DEBUG)"


def test_production_settings_pass_check_deploy(tmp_path):
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=_production_env(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_fails_without_https_settings(tmp_path):
    """The check above is not vacuous: without FEDSITE_HTTPS the same command reports the security gaps."""
    env = _production_env(tmp_path)
    del env["FEDSITE_HTTPS"]

    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=env)

    assert result.returncode != 0
    assert "security.W004" in result.stderr  # no HSTS
    assert "security.W012" in result.stderr  # session cookie not Secure


@pytest.mark.parametrize("stack", ["embedded", "real"])
def test_debug_is_off_unless_asked(tmp_path, stack):
    env = _production_env(tmp_path) if stack == "real" else _base_env(tmp_path)

    result = _manage("shell", "-c", PRINT_DEBUG, env=env)

    assert result.returncode == 0, result.stderr
    assert "DEBUG False" in result.stdout


def test_debug_on_when_asked(tmp_path):
    result = _manage("shell", "-c", PRINT_DEBUG, env={**_base_env(tmp_path), "DJANGO_DEBUG": "1"})

    assert "DEBUG True" in result.stdout, result.stderr


def test_make_serve_and_demo_do_not_ask_for_debug():
    """``make serve`` is documented for the real stack too: it must not turn DEBUG on by itself."""
    result = subprocess.run(
        ["make", "-n", "serve", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert "manage.py serve" in result.stdout and "manage.py demo" in result.stdout
    assert "DJANGO_DEBUG" not in result.stdout


def test_embedded_mode_makes_and_keeps_its_own_secret_key(tmp_path):
    """No DJANGO_SECRET_KEY and no REDIS_URL: a random key is made once, kept 0600, and reused."""
    env = _base_env(tmp_path)
    show_key = "from django.conf import settings; print('KEY', settings.SECRET_KEY)"

    first = _manage("shell", "-c", show_key, env=env)
    second = _manage("shell", "-c", show_key, env=env)

    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "var" / "secret_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 50 and "insecure" not in key
    assert f"KEY {key}" in first.stdout and f"KEY {key}" in second.stdout


def test_real_stack_without_a_secret_key_refuses_to_start(tmp_path):
    env = _production_env(tmp_path)
    del env["DJANGO_SECRET_KEY"]

    result = _manage("check", env=env)

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is not set" in result.stderr
    assert not (tmp_path / "var" / "secret_key").exists()


def test_every_setting_read_from_the_environment_is_in_env_example():
    """STYLE §9: `.env.example` lists every variable the settings read."""
    import re

    sources = (ROOT / "fedsite" / "settings.py").read_text() + (ROOT / "fedsite" / "config.py").read_text()
    names = set(re.findall(r"""env(?:\.[a-z]+)?\(\s*["']([A-Z][A-Z0-9_]+)["']""", sources))
    names |= set(re.findall(r"""os\.environ(?:\.get)?[\[(]\s*["']([A-Z][A-Z0-9_]+)["']""", sources))
    assert len(names) > 20  # the pattern finds them
    documented = (ROOT / ".env.example").read_text()

    missing = sorted(name for name in names if not re.search(rf"\b{name}\b", documented))

    assert missing == []
