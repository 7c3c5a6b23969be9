"""The real server (``manage.py serve``) under hostile clients: its memory stays bounded and slow clients
are cut off (issue 7, item 1).

Oversized bodies, declared and chunked, slow bodies and slow headers are sent at once over raw sockets
while the server's resident memory is sampled; every one must get its 413 or 408 (JSON error shape) or a
closed connection, and the server must still answer afterwards.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from tests.live import ROOT, database_url, free_port, wait_for, wait_healthy

MiB = 1024 * 1024
GLOBAL_UPDATE_CAP = 4 * MiB  # FEDSITE_MAX_UPDATE_BYTES of the server under test
BIG = 100 * MiB  # what each hostile client tries to send
RSS_BUDGET = 96 * MiB  # growth allowed over the idle server; without limits one BIG body alone exceeds it
SOCKET_TIMEOUT = 30.0  # a client gives up (and the test fails) if the server never answers


@pytest.fixture
def server(transactional_db: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": database_url(),
            "FEDSITE_MEDIA_ROOT": str(tmp_path / "media"),
            "FEDSITE_MAX_UPDATE_BYTES": str(GLOBAL_UPDATE_CAP),
            "FEDSITE_HEADER_TIMEOUT": "2",
            "FEDSITE_BODY_IDLE_TIMEOUT": "2",
            "FEDSITE_BODY_TIMEOUT": "3",
            "FEDSITE_UPLOAD_TIMEOUT": "20",
            "FEDSITE_KEEP_ALIVE_TIMEOUT": "2",
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(tmp_path / "tmp"),  # where uploads are spooled: checked empty after each one
        }
    )
    (tmp_path / "tmp").mkdir()
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--graceful-timeout", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process=process, log=tmp_path / "server.log")
        yield {
            "base": base,
            "port": port,
            "pid": process.pid,
            "log": tmp_path / "server.log",
            "tmp": tmp_path / "tmp",
            "media": tmp_path / "media",
        }
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


# --- a tiny raw HTTP/1.1 client: it must be able to lie about lengths and to stall --------------------
def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _read_response(sock: socket.socket) -> dict[str, Any]:
    """Status, headers and JSON body of the server's answer; ``status`` None if it closed silently."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return {"status": None, "raw": data}
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        return {"status": None, "raw": data, "reset": True}
    return {
        "status": int(lines[0].split()[1]),
        "headers": headers,
        "json": json.loads(body) if body else None,
    }


def _push(sock: socket.socket, total: int, *, chunked: bool) -> int:
    """Send up to ``total`` body bytes in 64 KiB pieces, stopping as soon as the server answers."""
    sent = 0
    piece = b"{" * 65536
    try:
        while sent < total:
            if _answered(sock):
                return sent
            size = min(len(piece), total - sent)
            data = piece[:size]
            sock.sendall(b"%x\r\n%s\r\n" % (size, data) if chunked else data)
            sent += size
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def oversized(
    port: int,
    path: str,
    *,
    declare: int | None,
    send: int,
    chunked: bool,
    token: str = "fsa_not-a-real-token",
    content_type: str | None = None,
) -> dict[str, Any]:
    default_type = "application/octet-stream" if "update" in path else "application/json"
    headers = {"Content-Type": content_type or default_type}
    headers["Authorization"] = f"Bearer {token}"
    headers["X-Update-Meta"] = '{"num_examples": 1}'
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    elif declare is not None:
        headers["Content-Length"] = str(declare)
    with _connect(port) as sock:
        sock.sendall(_head("POST", path, headers))
        sent = _push(sock, send, chunked=chunked)
        return {**_read_response(sock), "sent": sent}


def headers_only(port: int, path: str, length: int, token: str = "fsa_not-a-real-token") -> dict[str, Any]:
    """A raw upload's request line and headers, declaring ``length`` bytes of body, and no body at all."""
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(length),
        "Authorization": f"Bearer {token}",
        "X-Update-Meta": '{"num_examples": 1}',
    }
    with _connect(port) as sock:
        sock.sendall(_head("POST", path, headers))
        return _read_response(sock)


def slow_body(port: int, *, drip_every: float | None) -> dict[str, Any]:
    """A declared 1000-byte JSON body of which 10 bytes come, then nothing (or one byte per interval)."""
    with _connect(port) as sock:
        sock.sendall(
            _head(
                "POST", "/api/v1/agent/enroll", {"Content-Type": "application/json", "Content-Length": "1000"}
            )
        )
        sock.sendall(b'{"agent_id')
        sent = 10
        if drip_every is not None:  # steady enough to beat the idle timeout, too slow for the deadline
            try:
                while sent < 1000 and not _answered(sock):
                    time.sleep(drip_every)
                    sock.sendall(b" ")
                    sent += 1
            except (BrokenPipeError, ConnectionResetError):
                pass
        return {**_read_response(sock), "sent": sent}


def slow_headers(port: int) -> dict[str, Any]:
    """Half a request line and headers, then silence: the server must close the connection."""
    with _connect(port) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        return _read_response(sock)


def silent(port: int) -> dict[str, Any]:
    with _connect(port) as sock:
        return _read_response(sock)


def _sample_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    process = psutil.Process(pid)
    while not stop.wait(0.02):
        peak[0] = max(peak[0], process.memory_info().rss)


def _run_all(jobs: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}

    def run(name: str, job: Callable[[], dict[str, Any]]) -> None:
        try:
            results[name] = job()
        except Exception as exc:  # reported by the assertions below, with the job's name
            results[name] = {"status": "client error", "error": repr(exc)}

    threads = [threading.Thread(target=run, args=item, name=item[0]) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def _assert_error(result: dict[str, Any], status: int, code: str) -> None:
    assert result["status"] == status, result
    assert result["headers"].get("connection") == "close", result
    error = result["json"]["error"]
    assert set(error) == {"code", "message", "details"} and error["code"] == code, error


@pytest.mark.e2e
def test_memory_stays_bounded_and_slow_clients_are_cut_off(server: dict[str, Any]) -> None:
    port = server["port"]
    upload = f"/api/v1/agent/tasks/{uuid.uuid4()}/update"
    jobs: dict[str, Callable[[], dict[str, Any]]] = {}
    for i in range(3):
        # a JSON endpoint (tens of KiB) fed a whole BIG body that announces its size truthfully ...
        jobs[f"enroll declared {i}"] = lambda: oversized(
            port, "/api/v1/agent/enroll", declare=BIG, send=BIG, chunked=False
        )
        # ... or that announces nothing (chunked)
        jobs[f"enroll chunked {i}"] = lambda: oversized(
            port, "/api/v1/agent/enroll", declare=None, send=BIG, chunked=True
        )
        # a multipart upload goes through Django's handler, behind the server-wide cap
        jobs[f"upload chunked {i}"] = lambda: oversized(
            port, upload, declare=None, send=BIG, chunked=True, content_type="multipart/form-data; boundary=b"
        )
        # a raw one is refused before its body is read: this token is nobody's (fedsite.asgi.AgentTransferApp)
        jobs[f"raw upload, stranger {i}"] = lambda: headers_only(port, upload, MiB)
    jobs["upload declared 600 MB"] = lambda: oversized(
        port, upload, declare=600 * MiB, send=BIG, chunked=False
    )
    jobs["slow body, stalled"] = lambda: slow_body(port, drip_every=None)
    jobs["slow body, dripping"] = lambda: slow_body(port, drip_every=0.5)
    jobs["slow headers"] = lambda: slow_headers(port)
    jobs["silent connection"] = lambda: silent(port)

    # warm up every code path once, so that lazy imports and caches are in the baseline
    with httpx.Client(base_url=server["base"], timeout=SOCKET_TIMEOUT) as client:
        for _ in range(3):
            client.post("/api/v1/agent/enroll", json={"enrollment_key": "nope", "agent_id": "warm"})
            client.post(upload, content=b"x" * 1000, headers={"Authorization": "Bearer fsa_x"})
    baseline = psutil.Process(server["pid"]).memory_info().rss
    peak = [baseline]
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(server["pid"], stop, peak))
    sampler.start()
    try:
        results = _run_all(jobs)
    finally:
        stop.set()
        sampler.join()
    log = server["log"].read_text()

    assert set(results) == set(jobs), log
    for i in range(3):
        _assert_error(results[f"enroll declared {i}"], 413, "payload_too_large")
        assert results[f"enroll declared {i}"]["json"]["error"]["details"]["max_bytes"] == 64 * 1024
        _assert_error(results[f"enroll chunked {i}"], 413, "payload_too_large")
        _assert_error(results[f"upload chunked {i}"], 413, "payload_too_large")
        # cut off near the limit, not after the whole body (the kernel buffers a few MiB in flight)
        assert results[f"upload chunked {i}"]["sent"] < BIG, results[f"upload chunked {i}"]
        stranger = results[f"raw upload, stranger {i}"]
        # answered while its declared body had not been sent at all (a server reading it first would wait
        # for it, then answer 408)
        _assert_error(stranger, 401, "invalid_token")
    declared = results["upload declared 600 MB"]
    _assert_error(declared, 413, "payload_too_large")
    assert declared["json"]["error"]["details"]["content_length"] == 600 * MiB
    _assert_error(results["slow body, stalled"], 408, "request_timeout")
    _assert_error(results["slow body, dripping"], 408, "request_timeout")
    assert results["slow body, dripping"]["sent"] < 1000  # cut off before it finished
    assert results["slow headers"]["status"] is None and not results["slow headers"]["raw"], results
    assert results["silent connection"]["status"] is None, results

    growth = peak[0] - baseline
    assert growth < RSS_BUDGET, f"server RSS grew by {growth / MiB:.0f} MiB\n{log}"
    assert httpx.get(f"{server['base']}/api/health", timeout=10).status_code == 200


@pytest.mark.e2e
def test_uploads_stream_through_the_real_server(
    server: dict[str, Any], make_agent: Any, make_training: Any
) -> None:
    """A valid upload, sent chunked, is accepted; one past its task's limit is cut off there with 413."""
    from flcore.parameters import ParameterSpec, to_bytes
    from trainings import services
    from trainings.models import ClientUpdate

    (agent_a, token_a), (agent_b, token_b) = make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2)
    task_a = services.task_next_for_agent(agent=agent_a)
    task_b = services.task_next_for_agent(agent=agent_b)
    spec = ParameterSpec.from_json(training.parameter_spec)
    good = to_bytes({t.name: np.full(t.shape, 0.1, dtype=np.float32) for t in spec.tensors})
    limit = services.update_max_bytes(training)
    assert limit < GLOBAL_UPDATE_CAP

    def chunks(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 100):
            yield data[start : start + 100]

    headers = {"Content-Type": "application/octet-stream", "X-Update-Meta": '{"num_examples": 5}'}
    with httpx.Client(base_url=server["base"], timeout=SOCKET_TIMEOUT) as client:
        accepted = client.post(
            f"/api/v1/agent/tasks/{task_a.pk}/update",
            content=chunks(good),
            headers={**headers, "Authorization": f"Bearer {token_a}"},
        )
        assert accepted.status_code == 201, accepted.text
        too_big = oversized(
            server["port"],
            f"/api/v1/agent/tasks/{task_b.pk}/update",
            declare=None,
            send=2 * MiB,
            chunked=True,
            token=token_b,
        )
    assert ClientUpdate.objects.filter(task=task_a).get().size_bytes == len(good)
    # past the task's limit but under the server-wide cap: refused by the service while streaming
    assert too_big["status"] == 413, too_big
    assert too_big["json"]["error"]["code"] == "update_too_large"
    assert too_big["json"]["error"]["details"] == {"max_update_bytes": limit}
    assert not ClientUpdate.objects.filter(task=task_b).exists()


@pytest.mark.e2e
def test_raw_uploads_are_spooled_as_they_arrive_and_nothing_is_kept_when_refused(
    server: dict[str, Any], make_agent: Any, make_training: Any
) -> None:
    """The ASGI layer spools a raw body to the blob file as it arrives (fedsite.asgi.AgentTransferApp):
    an accepted one becomes the blob byte for byte; a refused one, or one cut off by its client, leaves no
    row, no blob and no temporary file."""
    import hashlib

    from flcore.parameters import ParameterSpec, to_bytes
    from trainings import services
    from trainings.models import ClientUpdate

    agent, token = make_agent()
    training = make_training(min_clients_per_round=1, max_clients_per_round=1)
    task = services.task_next_for_agent(agent=agent)
    spec = ParameterSpec.from_json(training.parameter_spec)
    shapes = {t.name: t.shape for t in spec.tensors}
    good = to_bytes({name: np.full(shape, 0.25, dtype=np.float32) for name, shape in shapes.items()})
    other = to_bytes({name: np.full(shape, 0.5, dtype=np.float32) for name, shape in shapes.items()})
    with_nan = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
    next(iter(with_nan.values())).flat[0] = np.nan
    wrong_shape = {name: np.zeros((3,), dtype=np.float32) for name in shapes}
    limit = services.update_max_bytes(training)
    url = f"/api/v1/agent/tasks/{task.pk}/update"
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Update-Meta": '{"num_examples": 5}',
        "Authorization": f"Bearer {token}",
    }

    def blobs() -> list[Path]:
        return sorted(p for p in server["media"].rglob("*.safetensors"))

    def leftovers() -> list[str]:
        return sorted(p.name for p in server["tmp"].iterdir() if p.name.startswith("fedsite-upload-"))

    before = blobs()
    with httpx.Client(base_url=server["base"], timeout=SOCKET_TIMEOUT) as client:
        refused = {
            "garbage": client.post(url, content=b"\x00" * len(good), headers=headers),
            "not finite": client.post(url, content=to_bytes(with_nan), headers=headers),
            "wrong shapes": client.post(url, content=to_bytes(wrong_shape), headers=headers),
            "over the task's limit": client.post(url, content=b"x" * (limit + 1), headers=headers),
        }
        for what, response in refused.items():
            assert 400 <= response.status_code < 500, (what, response.status_code, response.text)
            assert response.json()["error"]["message"], what
        assert refused["garbage"].json()["error"]["code"].startswith("bad_update_")
        assert refused["not finite"].json()["error"]["code"].startswith("bad_update_")
        assert refused["over the task's limit"].status_code == 413
        assert refused["over the task's limit"].json()["error"]["code"] == "update_too_large"
        assert not ClientUpdate.objects.filter(task=task).exists()
        assert blobs() == before
        # the spool file of a refused body is removed once its answer is sent, so look until it is gone
        wait_for(lambda: leftovers() == [], 10, "the refused bodies' spool files to be removed", leftovers)

        # a client that goes away half-way through its body
        with _connect(server["port"]) as sock:
            sock.sendall(_head("POST", url, {**headers, "Content-Length": str(len(good))}))
            sock.sendall(good[: len(good) // 2])
        wait_for(lambda: leftovers() == [], 10, "the half-sent body's spool file to be removed", leftovers)

        accepted = client.post(url, content=good, headers=headers)
        assert accepted.status_code == 201, accepted.text
        again = client.post(url, content=good, headers=headers)
        different = client.post(url, content=other, headers=headers)

    sha256 = hashlib.sha256(good).hexdigest()
    stored = ClientUpdate.objects.get(task=task)
    assert accepted.json()["sha256"] == stored.blob_sha256 == sha256 and stored.size_bytes == len(good)
    [blob] = [p for p in blobs() if p not in before]
    assert blob.read_bytes() == good and blob.name == f"{sha256}.safetensors"
    assert again.status_code == 200 and again.json()["sha256"] == sha256  # idempotent
    assert different.status_code == 409 and different.json()["error"]["code"] == "update_conflict"
    assert ClientUpdate.objects.filter(task=task).count() == 1 and blob.read_bytes() == good
    wait_for(lambda: leftovers() == [], 10, "the conflicting body's spool file to be removed", leftovers)
