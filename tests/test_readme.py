"""The README's "Using it" commands work as written, in order, on a fresh clone with nothing configured.

A fresh clone is the tracked files only (no ``var/``, no ``.env``, no secret key in the environment); the
virtualenv is this one, linked in, as ``make venv`` would leave it. The block runs in one bash process
on a pseudo-terminal, so ``createsuperuser`` asks its questions as it does for a person, and the test
answers them. Then the operator it created logs in to the dashboard the README names.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e

ANSWERS = [
    (re.compile(rb"Username[^:]*: $"), b"operator\n"),
    (re.compile(rb"Email address: $"), b"\n"),
    (re.compile(rb"Password: $"), b"a-long-operator-password\n"),
    (re.compile(rb"Password \(again\): $"), b"a-long-operator-password\n"),
]


def readme_block(heading: str = "## Using it") -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    match = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert match, f"no bash block under {heading!r}"
    return match.group(1)


def _fresh_clone(destination: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (destination / ".venv").symlink_to(Path(sys.prefix))
    return destination


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _user_environment() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "FEDSITE_", "FEDAGENT_", "MAKE"))
        and key not in {"DATABASE_URL", "REDIS_URL", "MFLAGS"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_on_a_terminal(script: Path, cwd: Path, timeout: float, log: Path) -> tuple[int, bytes]:
    """Run ``bash script`` with a pseudo-terminal as its terminal; answer createsuperuser's prompts.

    Everything the terminal shows is also written to ``log`` as it arrives.
    """
    master, slave = pty.openpty()
    process = subprocess.Popen(
        ["bash", "-e", str(script)],
        cwd=cwd,
        env=_user_environment(),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    output = b""
    pending = list(ANSWERS)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            output += chunk
            with log.open("ab") as handle:
                handle.write(chunk)
            if pending and pending[0][0].search(output[-200:]):
                os.write(master, pending.pop(0)[1])
        returncode = process.poll()
        assert not pending or returncode is not None, f"unanswered prompts: {[p.pattern for p, _ in pending]}"
        assert returncode is not None, "the README's commands did not finish:\n" + output[-4000:].decode(
            errors="replace"
        )
        return returncode, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # `make serve &` and anything else left behind
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        os.close(master)


@pytest.mark.timeout(600)
def test_readme_commands_work_as_written_on_a_fresh_clone(tmp_path):
    if not _port_is_free(8080):
        pytest.fail("port 8080, which the README's `make serve` uses, is taken on this machine")
    clone = _fresh_clone(tmp_path / "fedsite")
    block = readme_block()
    # after the block, while `make serve &` still runs: the operator created above logs in
    check = (
        "code=$(.venv/bin/python -c \"import httpx,re;c=httpx.Client(base_url='http://127.0.0.1:8080');"
        "t=re.search(r'csrfmiddlewaretoken\\\" value=\\\"([^\\\"]+)',c.get('/admin/login/').text).group(1);"
        "r=c.post('/admin/login/?next=/',data={'csrfmiddlewaretoken':t,'username':'operator',"
        "'password':'a-long-operator-password','next':'/'});print(r.status_code, c.get('/').status_code)\")\n"
        'echo "LOGIN $code"\n'
    )
    script = tmp_path / "readme.sh"
    script.write_text(block + check, encoding="utf-8")

    returncode, output = _run_on_a_terminal(script, clone, timeout=480, log=tmp_path / "terminal.log")

    text = output.decode(errors="replace")
    assert returncode == 0, text[-4000:]
    assert "Superuser created successfully" in text, text[-4000:]
    assert "LOGIN 302 200" in text, text[-4000:]
    assert re.search(r"completed", text), text[-4000:]
    assert (clone / "var" / "fedsite.sqlite3").is_file()
    assert (clone / "var" / "secret_key").is_file()  # made by the embedded mode, not given


def test_the_example_training_configuration_is_valid():
    import json

    from trainings.configuration import TrainingConfiguration

    data = json.loads((ROOT / "docs" / "examples" / "digits-training.json").read_text())
    configuration = TrainingConfiguration.from_dict(data)

    assert configuration.min_clients_per_round == 2
    assert "docs/examples/digits-training.json" in readme_block()
