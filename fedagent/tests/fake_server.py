"""A tiny in-process server speaking agent protocol v1, standing in for fedsite in the SDK's unit tests.

It implements the protocol as ``docs/agent-protocol.md`` writes it (auth, long-poll, ETag/304, multipart
upload with idempotency and conflicts, task_closed, fail), records every request, and lets a test script
the next answers of an endpoint (e.g. two 503 before the real answer).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flcore.errors import SerdeError
from flcore.parameters import Parameters, ParameterSpec, from_bytes, sha256_hex, to_bytes

PREFIX = "/api/v1/agent/"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0


@dataclass
class Upload:
    task_id: str
    update: bytes
    meta: dict[str, Any]
    parameters: Parameters
    sha256: str


@dataclass
class Scripted:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def error_body(code: str, message: str, **details: Any) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "details": details}}).encode()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up (a stopped long-poll, a capped download) is normal here; anything else is not.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeAgentServer:
    """State and behaviour of the fake server; ``url`` is where it listens."""

    def __init__(self, port: int = 0) -> None:
        self.tokens: dict[str, str] = {"good-token": "agent_001"}
        self.enrollment_key = "enroll-me"
        self.heartbeat_interval = 30
        self.models: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.queue: list[str] = []
        self.closed: set[str] = set()
        self.uploads: dict[str, Upload] = {}
        self.failures: list[tuple[str, str]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.requests: list[Recorded] = []
        self.scripts: dict[tuple[str, str], list[Scripted]] = {}
        self.training_status: dict[str, str] = {}
        self.corrupt_model_bytes = False
        self.lock = threading.Condition()
        self.closing = False
        self.httpd = _QuietServer(("127.0.0.1", port), _make_handler(self))
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeAgentServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- set-up helpers -------------------------------------------------------------------------------

    def add_model(self, params: Parameters, spec: dict[str, Any] | None) -> dict[str, Any]:
        blob = to_bytes(params)
        version_id = str(uuid.uuid4())
        model = {
            "version_id": version_id,
            "number": len(self.models),
            "sha256": sha256_hex(blob),
            "url": f"{PREFIX}models/{version_id}",
            "spec": spec,
            "parameters": ParameterSpec.from_parameters(params).to_json(),
        }
        self.models[version_id] = {"ref": model, "blob": blob, "params": params}
        return model

    def add_task(
        self,
        model: dict[str, Any],
        *,
        config: dict[str, Any] | None = None,
        training_id: str | None = None,
        round_number: int = 1,
        max_update_bytes: int = 50_000_000,
        **overrides: Any,
    ) -> dict[str, Any]:
        task_id = str(uuid.uuid4())
        task = {
            "task_id": task_id,
            "kind": "fit",
            "training_id": training_id or str(uuid.uuid4()),
            "round": round_number,
            "deadline": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
            "model": model,
            "config": config
            or {
                "local_epochs": 1,
                "batch_size": 16,
                "learning_rate": 0.1,
                "seed": 123,
                "proximal_mu": 0.0,
                "max_steps": None,
            },
            "upload_url": f"{PREFIX}tasks/{task_id}/update",
            "max_update_bytes": max_update_bytes,
            **overrides,
        }
        with self.lock:
            self.tasks[task_id] = task
            self.queue.append(task_id)
            self.lock.notify_all()
        return task

    def script(self, method: str, path_prefix: str, *answers: Scripted) -> None:
        """Answer the next requests whose path starts with ``path_prefix`` with ``answers``, in order."""
        with self.lock:
            self.scripts.setdefault((method, path_prefix), []).extend(answers)

    def requests_to(self, method: str, path_prefix: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    def wait_for_request(self, method: str, path_prefix: str, timeout: float = 10.0) -> Recorded:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.requests_to(method, path_prefix)
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no {method} {path_prefix} within {timeout}s")


def _parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
    )
    parts: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            parts[name] = payload
    return parts


def _make_handler(server: FakeAgentServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        # -- responses ------------------------------------------------------------------------------

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.record.status = status
            self.send_response(status)
            all_headers = {"Content-Type": "application/json"} if body else {}
            all_headers.update(headers or {})
            for key, value in all_headers.items():
                self.send_header(key, value)
            if status not in (204, 304):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if status not in (204, 304):
                self.wfile.write(body)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode())

        def _error(self, status: int, code: str, message: str, **details: Any) -> None:
            self._send(status, error_body(code, message, **details))

        # -- dispatch -------------------------------------------------------------------------------

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            self.record = Recorded(
                method, parts.path, parse_qs(parts.query), dict(self.headers.items()), body
            )
            with server.lock:
                server.requests.append(self.record)
                for (script_method, prefix), answers in server.scripts.items():
                    if script_method == method and parts.path.startswith(prefix) and answers:
                        answer = answers.pop(0)
                        break
                else:
                    answer = None
            if answer is not None:
                self._send(answer.status, answer.body, answer.headers)
                return
            path = parts.path
            if path.startswith("/api/training/") and path.endswith("/status") and method == "GET":
                training_id = path.split("/")[3]
                if training_id not in server.training_status:
                    self._error(404, "not_found", "No such training.")
                else:
                    self._json(
                        200, {"training_id": training_id, "status": server.training_status[training_id]}
                    )
                return
            if not path.startswith(PREFIX):
                self._error(404, "not_found", "No such endpoint.")
                return
            route = path[len(PREFIX) :]
            if route == "enroll" and method == "POST":
                self._enroll(body)
                return
            agent_id = self._authenticate()
            if agent_id is None:
                return
            if route == "heartbeat" and method == "POST":
                payload = json.loads(body or b"{}")
                with server.lock:
                    server.heartbeats.append(payload)
                self._json(
                    200,
                    {
                        "agent_id": agent_id,
                        "server_time": datetime.now(UTC).isoformat(),
                        "heartbeat_interval": server.heartbeat_interval,
                    },
                )
            elif route == "tasks/next" and method == "GET":
                self._next_task(parse_qs(parts.query))
            elif route.startswith("models/") and method == "GET":
                self._model(route.split("/")[1])
            elif route.startswith("tasks/") and route.endswith("/update") and method == "POST":
                self._upload(route.split("/")[1], body)
            elif route.startswith("tasks/") and route.endswith("/fail") and method == "POST":
                task_id = route.split("/")[1]
                reason = json.loads(body)["reason"]
                with server.lock:
                    server.failures.append((task_id, reason))
                self._json(200, {"task_id": task_id, "status": "failed"})
            else:
                self._error(404, "not_found", "No such endpoint.")

        def _authenticate(self) -> str | None:
            header = self.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
            if token is None or token not in server.tokens:
                self._error(
                    401, "not_authenticated", "Send a valid agent token as 'Authorization: Bearer <token>'."
                )
                return None
            return server.tokens[token]

        def _enroll(self, body: bytes) -> None:
            payload = json.loads(body)
            if payload.get("enrollment_key") != server.enrollment_key:
                self._error(403, "invalid_enrollment_key", "Ask the operator for a valid enrollment key.")
                return
            agent_id = payload["agent_id"]
            if agent_id in server.tokens.values():
                self._error(409, "agent_exists", f"Agent {agent_id!r} is already enrolled; use its token.")
                return
            token = f"token-{uuid.uuid4().hex}"
            server.tokens[token] = agent_id
            self._json(
                201, {"agent_id": agent_id, "token": token, "heartbeat_interval": server.heartbeat_interval}
            )

        def _next_task(self, query: dict[str, list[str]]) -> None:
            wait = float(query.get("wait", ["0"])[0])
            deadline = time.monotonic() + wait
            with server.lock:
                while not server.queue and not server.closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    server.lock.wait(remaining)
                task_id = server.queue.pop(0) if server.queue else None
            if task_id is None:
                self._send(204)
            else:
                self._json(200, server.tasks[task_id])

        def _model(self, version_id: str) -> None:
            model = server.models.get(version_id)
            if model is None:
                self._error(404, "not_found", "No such model version.")
                return
            etag = f'"{model["ref"]["sha256"]}"'
            if self.headers.get("If-None-Match") == etag:
                self._send(304, headers={"ETag": etag})
                return
            blob = model["blob"]
            if server.corrupt_model_bytes:
                blob = blob[:-4] + bytes(4)
            self._send(200, blob, {"Content-Type": "application/octet-stream", "ETag": etag})

        def _upload(self, task_id: str, body: bytes) -> None:
            task = server.tasks.get(task_id)
            if task is None:
                self._error(404, "not_found", "No such task.")
                return
            if task_id in server.closed:
                self._error(409, "task_closed", "The round closed; drop this update and poll for a new task.")
                return
            if len(body) > task["max_update_bytes"] + 4096:
                self._error(413, "update_too_large", "The update is too large.")
                return
            if self.headers["Content-Type"] == "application/octet-stream":  # the raw form of the protocol
                parts = {"update": body}
                if self.headers.get("X-Update-Meta") is not None:
                    parts["meta"] = self.headers["X-Update-Meta"].encode()
            else:
                parts = _parse_multipart(self.headers["Content-Type"], body)
            if "update" not in parts or "meta" not in parts:
                self._error(400, "invalid_update", "Send multipart parts 'update' and 'meta'.")
                return
            spec = ParameterSpec.from_json(task["model"]["parameters"])
            try:
                params = from_bytes(parts["update"], spec=spec, max_bytes=task["max_update_bytes"])
            except SerdeError as exc:
                self._error(400, "invalid_update", exc.message, reason=exc.code)
                return
            meta = json.loads(parts["meta"])
            if not isinstance(meta.get("num_examples"), int) or meta["num_examples"] <= 0:
                self._error(400, "invalid_update", "meta.num_examples must be a positive integer.")
                return
            digest = sha256_hex(parts["update"])
            with server.lock:
                existing = server.uploads.get(task_id)
                if existing is not None:
                    if existing.sha256 != digest:
                        self._error(
                            409, "update_conflict", "A different update was already stored for this task."
                        )
                    else:
                        self._json(200, {"task_id": task_id, "status": "accepted", "sha256": digest})
                    return
                server.uploads[task_id] = Upload(task_id, parts["update"], meta, params, digest)
            self._json(201, {"task_id": task_id, "status": "accepted", "sha256": digest})

    return Handler
