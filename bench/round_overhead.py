"""Round overhead on the real stack: seconds per round beyond training, and where they go.

Starts, on this machine, the whole service as an operator would run it -- ``manage.py serve`` (uvicorn,
one process), a Celery worker with embedded beat (``-Q aggregation,privacy,default --concurrency 2 -B``,
plus ``-E`` so that this script can time the aggregation task from the worker's own events), Postgres
and Redis -- then enrolls ``--agents`` fedagent :class:`~fedagent.client.FederatedClient` instances (threads,
spread over ``--agent-processes`` processes) whose trainer does no work: ``fit`` returns the global
parameters plus N(0, 1e-6) noise (``--trainer noise``, the default: 1M normal draws per agent per round,
about 13 ms of CPU each, 0.65 CPU-s a round for 50 agents on the server's own cores), or plus a noise
array drawn once per agent (``--trainer fixed-noise``: one add per round, so the round's CPU is the
service's and the transfers', not the stand-in trainer's). A training of an ``mlp`` (``--input-dim``,
``--hidden``, 10 classes, about 1M parameters) with min = max clients = ``--agents`` runs ``--rounds``
rounds of FedAvg.

Timestamps (all wall clock on one machine): server side ``Round.opened_at/closed_at/completed_at``,
``Task.delivered_at``, ``ClientUpdate.created_at``, ``ModelVersion.created_at``,
``Round.metrics["aggregation_seconds"]``; worker side the Celery events ``task-received/started/
succeeded`` of ``trainings.aggregate_round``; agent side when the long-poll returned the task, the model
download, ``fit`` and the upload request.

Every process started here is in its own session and is killed (its whole process group) on exit,
including on errors and Ctrl-C. The database ``--database`` is dropped and re-created, and Redis db
``--redis-db`` is flushed, at the start of each run.

Usage::

    .venv/bin/python bench/round_overhead.py --agents 50 --rounds 5
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
CELERY = str(REPO_ROOT / ".venv" / "bin" / "celery")
UVICORN = str(REPO_ROOT / ".venv" / "bin" / "uvicorn")
ENROLLMENT_KEY = "bench-enrollment-key"
AGENT_PREFIX = "bench-agent-"
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------------------
# Agent processes (``--agent-worker``): fedagent clients in threads, timing every step of every task
# ----------------------------------------------------------------------------------------------------------
def agent_worker(args: argparse.Namespace) -> None:
    import numpy as np

    from fedagent.client import FederatedClient
    from fedagent.trainer import EvalResult, FitConfig, FitResult, Trainer
    from flcore.parameters import Parameters

    out_lock = threading.Lock()
    out = open(args.out, "a", buffering=1)  # noqa: SIM115 - one line per finished task, kept open

    def emit(record: dict[str, Any]) -> None:
        with out_lock:
            out.write(json.dumps(record) + "\n")

    class NoiseTrainer(Trainer):
        """Does no training: returns the global parameters plus N(0, 1e-6) noise."""

        def __init__(self, client: TimedClient) -> None:
            self._client = client
            self._parameters: Parameters = {}

        def get_parameters(self) -> Parameters:
            return self._parameters

        def set_parameters(self, parameters: Parameters) -> None:
            self._parameters = parameters

        def fit(self, x: Any, y: Any, config: FitConfig, rng: np.random.Generator) -> FitResult:
            started = time.time()
            fixed = self._client.fixed_noise
            for name, array in self._parameters.items():
                if args.trainer == "noise":
                    array += rng.standard_normal(array.shape, dtype=np.float32) * np.float32(1e-6)
                    continue
                if name not in fixed:  # drawn once per agent; every agent's update still differs
                    fixed[name] = rng.standard_normal(array.shape, dtype=np.float32) * np.float32(1e-6)
                array += fixed[name]
            self._client.current["fit_start"], self._client.current["fit_end"] = started, time.time()
            return FitResult(num_examples=len(y), metrics={"train_loss": 0.0, "train_accuracy": 0.0})

        def evaluate(self, x: Any, y: Any) -> EvalResult:
            return EvalResult(loss=0.0, accuracy=0.0, num_examples=len(y))

    class TimedClient(FederatedClient):
        """A FederatedClient that records when each step of a task started and ended."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.current: dict[str, Any] = {}
            self.fixed_noise: dict[str, Any] = {}  # --trainer fixed-noise
            upload = self._http.upload_update

            def timed_upload(url: str, blob: bytes, meta: dict[str, Any], **kwargs: Any) -> Any:
                self.current["upload_start"] = time.time()
                try:
                    return upload(url, blob, meta, **kwargs)
                finally:
                    self.current["upload_end"] = time.time()

            self._http.upload_update = timed_upload  # type: ignore[method-assign]

        def process_task(self, task_json: dict[str, Any]) -> Any:
            self.current = {
                "agent_id": self.agent_id,
                "task_id": task_json.get("task_id"),
                "round": task_json.get("round"),
                "received": time.time(),
            }
            outcome = None
            try:
                outcome = super().process_task(task_json)
                return outcome
            finally:
                self.current["done"] = time.time()
                self.current["status"] = getattr(outcome, "status", "error")
                emit(self.current)

        def _fetch_model(self, model: Any, log: Any, **kwargs: Any) -> Any:
            self.current["download_start"] = time.time()
            try:
                return super()._fetch_model(model, log, **kwargs)
            finally:
                self.current["download_end"] = time.time()

    rng = np.random.default_rng(args.first)
    clients: list[TimedClient] = []
    for index in range(args.first, args.first + args.count):
        client = TimedClient(
            agent_id=f"{AGENT_PREFIX}{index:03d}",
            server=args.server,
            enrollment_key=ENROLLMENT_KEY,
            poll_wait=args.poll_wait,
            timeout=120.0,
        )
        client.trainer_factory = lambda model, c=client: NoiseTrainer(c)
        client.add_dataset(
            "bench", rng.standard_normal((10, args.input_dim)), rng.integers(0, NUM_CLASSES, 10)
        )
        client.connect()
        clients.append(client)
    print("READY", flush=True)
    training_id = sys.stdin.readline().strip()
    if not training_id:
        return
    threads = [
        threading.Thread(
            target=client.run,
            kwargs={"exit_when_training_done": training_id, "handle_signals": False},
            name=client.agent_id,
            daemon=True,
        )
        for client in clients
    ]
    for thread in threads:
        thread.start()

    def wait_for_stop() -> None:
        sys.stdin.readline()  # "STOP" or EOF
        for client in clients:
            client.stop()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    out.close()


# ----------------------------------------------------------------------------------------------------------
# Process management: everything started here dies with this script
# ----------------------------------------------------------------------------------------------------------
class Processes:
    """Popen'ed children, each in its own session; :meth:`stop_all` kills their process groups."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[Any]]] = []
        self._stopped = False

    def start(
        self, name: str, argv: list[str], *, env: dict[str, str], log: Path, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        handle = open(log, "wb")  # noqa: SIM115 - closed when the child ends
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO_ROOT,
            stdout=kwargs.pop("stdout", handle),
            stderr=handle,
            start_new_session=True,
            **kwargs,
        )
        self.children.append((name, process))
        return process

    def stop_all(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        for _, process in reversed(self.children):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, process in reversed(self.children):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"teardown: {name} (pid {process.pid}) ignored SIGTERM; killing it", file=sys.stderr)
        for _, process in self.children:
            _signal_group(process, signal.SIGKILL)  # leftovers in the group (pool children)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


def _signal_group(process: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # the child is a session leader: its pgid is its pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_healthy(server: subprocess.Popen[Any], server_url: str, log: Path, timeout: float = 60) -> None:
    """Wait until the server answers ``/api/health`` 200; raise at once if it exited (see ``log``)."""
    import httpx

    def healthy() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; see {log}")
        try:
            return httpx.get(f"{server_url}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout, "the server's /api/health")


# ----------------------------------------------------------------------------------------------------------
# Celery events: when the worker received, started and finished each aggregation
# ----------------------------------------------------------------------------------------------------------
@dataclass
class CeleryEvents:
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    receiver: Any = None

    def handle(self, event: dict[str, Any]) -> None:
        if "uuid" not in event:  # worker heartbeats and the like
            return
        record = self.tasks.setdefault(event["uuid"], {})
        record[event["type"]] = event["timestamp"]
        if event["type"] == "task-received":
            record["name"] = event.get("name")
            record["args"] = event.get("args")

    def start(self) -> None:
        from fedsite.celery import app

        ready = threading.Event()

        def run() -> None:
            with app.connection() as connection:
                self.receiver = app.events.Receiver(connection, handlers={"*": self.handle})
                ready.set()
                try:
                    self.receiver.capture(limit=None, timeout=None, wakeup=False)
                except Exception as exc:
                    print(f"celery event capture stopped: {exc}", file=sys.stderr)

        threading.Thread(target=run, name="celery-events", daemon=True).start()
        ready.wait(10)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True

    def aggregation_for_round(self, round_id: int) -> dict[str, Any] | None:
        for record in self.tasks.values():
            if record.get("name") == "trainings.aggregate_round" and str(record.get("args", "")).strip(
                "()[], "
            ) == str(round_id):
                return record
        return None


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def mlp_parameter_count(input_dim: int, hidden: list[int]) -> int:
    sizes = [input_dim, *hidden, NUM_CLASSES]
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def run_psql(argv: list[str], env: dict[str, str]) -> None:
    subprocess.run(argv, env=env, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--input-dim", type=int, default=784)
    parser.add_argument(
        "--hidden", default="1258", help="comma-separated hidden sizes (default 1258: 1.0M params)"
    )
    parser.add_argument("--agent-processes", type=int, default=2)
    parser.add_argument("--poll-wait", type=float, default=20.0, help="agents' long-poll wait, seconds")
    parser.add_argument(
        "--trainer",
        choices=("noise", "fixed-noise"),
        default="noise",
        help="the agents' stand-in trainer: fresh N(0, 1e-6) noise every fit (default), or noise drawn "
        "once per agent and added every fit",
    )
    parser.add_argument("--database", default="fedsite_bench")
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="Postgres server URL")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with logs")
    parser.add_argument(
        "--web-workers",
        type=int,
        default=1,
        help="1: `manage.py serve` (one process, the default); N > 1: `uvicorn --workers N` (experiment)",
    )
    parser.add_argument(
        "--conn-max-age",
        type=int,
        default=None,
        help="set DATABASE_CONN_MAX_AGE for server and worker (default: the settings' default, 0)",
    )
    parser.add_argument("--agent-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent_worker:
        agent_worker(args)
        return
    if args.floor_server:
        floor_server(args)
        return

    hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="round-overhead-"))
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fedsite.settings",
        "DJANGO_SECRET_KEY": "bench",
        "DATABASE_URL": f"{args.pg}/{args.database}",
        "REDIS_URL": f"redis://127.0.0.1:6379/{args.redis_db}",
        "FEDSITE_VAR_DIR": str(workdir),
        "FEDSITE_MEDIA_ROOT": str(workdir / "media"),
        "FEDSITE_ENROLLMENT_KEY": ENROLLMENT_KEY,
        "FEDSITE_PUBLIC_BASE_URL": server_url,
        "OPENBLAS_NUM_THREADS": "1",
    }
    if args.conn_max_age is not None:
        env["DATABASE_CONN_MAX_AGE"] = str(args.conn_max_age)
    os.environ.update(env)  # this process also talks to the database (Django ORM) and Redis (Celery events)
    processes = Processes()
    atexit.register(processes.stop_all)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    events = CeleryEvents()
    try:
        report = run(args, hidden, workdir, port, server_url, env, processes, events)
    finally:
        events.stop()
        processes.stop_all()
        if not args.keep_logs:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
        else:
            print(f"logs kept in {workdir}", file=sys.stderr)
    print(report)


def run(
    args: argparse.Namespace,
    hidden: list[int],
    workdir: Path,
    port: int,
    server_url: str,
    env: dict[str, str],
    processes: Processes,
    events: CeleryEvents,
) -> str:
    import redis

    host = args.pg.rsplit("@", 1)[-1].split(":")[0]
    pg_port = args.pg.rsplit(":", 1)[-1]
    user = args.pg.split("//", 1)[1].split("@")[0]
    started_setup = time.monotonic()
    run_psql(["dropdb", "--if-exists", "-h", host, "-p", pg_port, "-U", user, args.database], env)
    run_psql(["createdb", "-h", host, "-p", pg_port, "-U", user, args.database], env)
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], env=env, cwd=REPO_ROOT, check=True
    )

    if args.web_workers > 1:  # several ASGI processes on one port (uvicorn's own supervisor)
        web_argv = [
            UVICORN,
            "fedsite.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(args.web_workers),
            "--lifespan",
            "off",
            "--log-level",
            "warning",
        ]
    else:
        web_argv = [PYTHON, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = processes.start("server", web_argv, env=env, log=workdir / "server.log")
    worker = processes.start(
        "worker",
        [
            CELERY,
            "-A",
            "fedsite",
            "worker",
            "-Q",
            "aggregation,privacy,default",
            "-l",
            "warning",
            "--concurrency",
            "2",
            "-B",
            "-E",
            "-s",
            str(workdir / "celerybeat-schedule"),
        ],
        env=env,
        log=workdir / "worker.log",
    )

    wait_healthy(server, server_url, workdir / "server.log")

    import django

    django.setup()
    from django.db import close_old_connections

    from trainings.configuration import TrainingConfiguration
    from trainings.models import ClientUpdate, Round, Task, Training
    from trainings.services import training_create_and_start
    from versioning.models import ModelVersion

    events.start()
    wait_until(lambda: worker.poll() is not None or _worker_ready(), 60, "the Celery worker")
    if worker.poll() is not None:
        raise RuntimeError(f"the Celery worker exited with {worker.returncode}; see {workdir / 'worker.log'}")

    # Agents: enroll and heartbeat first, so that all are eligible when the training starts.
    agents_out = workdir / "agents.jsonl"
    per_process = -(-args.agents // args.agent_processes)
    agent_procs = []
    for first in range(0, args.agents, per_process):
        count = min(per_process, args.agents - first)
        agent_procs.append(
            processes.start(
                f"agents-{first}",
                [
                    PYTHON,
                    str(Path(__file__).resolve()),
                    "--agent-worker",
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                    "--server",
                    server_url,
                    "--out",
                    str(agents_out),
                    "--poll-wait",
                    str(args.poll_wait),
                    "--input-dim",
                    str(args.input_dim),
                    "--trainer",
                    args.trainer,
                ],
                env=env,
                log=workdir / f"agents-{first}.log",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for proc in agent_procs:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "READY":
            raise RuntimeError(
                f"an agent process did not get ready (said {line!r}); see {workdir}/agents-*.log"
            )
    setup_seconds = time.monotonic() - started_setup

    configuration = TrainingConfiguration.from_dict(
        {
            "name": "bench round overhead",
            "model_type": "mlp",
            "input_dim": args.input_dim,
            "hidden_sizes": hidden,
            "num_classes": NUM_CLASSES,
            "max_rounds": args.rounds,
            "min_clients_per_round": args.agents,
            "max_clients_per_round": args.agents,
            "round_timeout_seconds": max(120.0, args.timeout / 2),
            "seed": 0,
        }
    )
    cpu_before = _cpu_snapshot(processes)
    run_started = time.time()
    training = training_create_and_start(configuration=configuration)
    for proc in agent_procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{training.pk}\n")
        proc.stdin.flush()

    def finished() -> bool:
        close_old_connections()
        for name, proc in processes.children:
            if proc.poll() is not None and not name.startswith("agents"):
                raise RuntimeError(f"{name} exited with {proc.returncode} during the run; see {workdir}")
        return Training.objects.get(pk=training.pk).is_terminal

    wait_until(finished, args.timeout, f"training {training.pk} to finish", interval=0.5)
    run_seconds = time.time() - run_started
    cpu_after = _cpu_snapshot(processes)
    time.sleep(1.0)  # let the last Celery events arrive
    for proc in agent_procs:
        try:
            assert proc.stdin is not None
            proc.stdin.write("STOP\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    training.refresh_from_db()
    if training.status != Training.Status.COMPLETED:
        raise RuntimeError(f"training ended {training.status}: {training.stop_reason}")
    rounds = list(Round.objects.filter(training=training).order_by("number"))
    tasks = list(Task.objects.filter(round__training=training).select_related("agent", "round"))
    updates = list(
        ClientUpdate.objects.filter(round__training=training).select_related("agent", "round", "task")
    )
    versions = {v.number: v for v in ModelVersion.objects.filter(training=training)}
    for proc in agent_procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=args.poll_wait + 10)
    agent_records = [json.loads(line) for line in agents_out.read_text().splitlines() if line.strip()]
    last_version = max(versions.values(), key=lambda v: v.number)
    from versioning.blobs import blob_local_path

    floor = measure_floor(
        blob_path=Path(blob_local_path(last_version.blob_name) or ""),
        agents=args.agents,
        reps=args.rounds,
        processes=processes,
        workdir=workdir,
        env=env,
    )
    return render_report(
        args=args,
        training=training,
        num_parameters=mlp_parameter_count(args.input_dim, hidden),
        spec_parameters=sum(_prod(t["shape"]) for t in training.parameter_spec),
        rounds=rounds,
        tasks=tasks,
        updates=updates,
        versions=versions,
        agent_records=agent_records,
        events=events,
        cpu=(cpu_before, cpu_after),
        run_seconds=run_seconds,
        setup_seconds=setup_seconds,
        floor=floor,
    )


# ----------------------------------------------------------------------------------------------------------
# The floor: the same bytes through loopback with a plain static file server (stdlib), in the same run
# ----------------------------------------------------------------------------------------------------------
def floor_server(args: argparse.Namespace) -> None:
    """``--floor-server``: a stdlib ThreadingHTTPServer on ``--directory``; POST reads and drops bodies."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining > 0:
                remaining -= len(self.rfile.read(min(remaining, 1 << 20)))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Handler, directory=args.directory)
    ThreadingHTTPServer(("127.0.0.1", args.port), handler).serve_forever()


def measure_floor(
    *, blob_path: Path, agents: int, reps: int, processes: Processes, workdir: Path, env: dict[str, str]
) -> dict[str, float]:
    """Wall time for ``agents`` concurrent clients to GET the version blob and POST it back, per round."""
    import httpx

    directory = workdir / "floor"
    directory.mkdir(exist_ok=True)
    (directory / "model.safetensors").write_bytes(blob_path.read_bytes())
    payload = blob_path.read_bytes()
    port = free_port()
    processes.start(
        "floor-server",
        [PYTHON, __file__, "--floor-server", "--port", str(port), "--directory", str(directory)],
        env=env,
        log=workdir / "floor.log",
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30, "the floor's static file server")
    clients = [httpx.Client(timeout=120) for _ in range(agents)]
    rounds: list[float] = []
    downloads: list[float] = []
    uploads: list[float] = []
    for _ in range(reps):
        barrier = threading.Barrier(agents + 1)

        def one(client: httpx.Client, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            started = time.monotonic()
            body = client.get(f"{base}/model.safetensors").content
            assert len(body) == len(payload)
            got = time.monotonic()
            client.post(f"{base}/update", content=payload)
            downloads.append(got - started)
            uploads.append(time.monotonic() - got)

        threads = [threading.Thread(target=one, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.monotonic()
        for thread in threads:
            thread.join()
        rounds.append(time.monotonic() - started)
    for client in clients:
        client.close()
    return {
        "round": statistics.median(rounds),
        "download": statistics.median(downloads),
        "upload": statistics.median(uploads),
        "bytes": float(len(payload)),
    }


def _worker_ready() -> bool:
    from fedsite.celery import app

    try:
        return bool(app.control.ping(timeout=1.0))
    except Exception:
        return False


def _prod(shape: list[int]) -> int:
    result = 1
    for d in shape:
        result *= int(d)
    return result


def _cpu_snapshot(processes: Processes) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each started process tree, and by Postgres and Redis."""
    import psutil

    totals: dict[str, float] = {}
    for name, proc in processes.children:
        key = "agents" if name.startswith("agents") else name
        try:
            root = psutil.Process(proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            try:
                t = p.cpu_times()
                totals[key] = totals.get(key, 0.0) + t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    for p in psutil.process_iter(["name", "cpu_times", "ppid"]):
        name = (p.info.get("name") or "").lower()
        key = "postgres" if name.startswith("postgres") else "redis" if name.startswith("redis") else None
        if key and p.info.get("cpu_times") is not None:
            t = p.info["cpu_times"]
            totals[key] = totals.get(key, 0.0) + t.user + t.system
            if key == "postgres":  # the postmaster also holds the CPU of its exited backends
                totals[key] += t.children_user + t.children_system
    me = psutil.Process()
    t = me.cpu_times()
    totals["bench (this script)"] = t.user + t.system
    return totals


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return statistics.median(ordered), p90, ordered[-1]


def render_report(
    *,
    args: argparse.Namespace,
    training: Any,
    num_parameters: int,
    spec_parameters: int,
    rounds: list[Any],
    tasks: list[Any],
    updates: list[Any],
    versions: dict[int, Any],
    agent_records: list[dict[str, Any]],
    events: CeleryEvents,
    cpu: tuple[dict[str, float], dict[str, float]],
    run_seconds: float,
    setup_seconds: float,
    floor: dict[str, float],
) -> str:
    lines: list[str] = []
    out = lines.append
    load = os.getloadavg()
    web = "manage.py serve (1 process)" if args.web_workers <= 1 else f"uvicorn --workers {args.web_workers}"
    out(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{args.agents} agents in {args.agent_processes} processes; long-poll wait {args.poll_wait:.0f}s; "
        f"web: {web}; trainer: {args.trainer}; "
        f"DATABASE_CONN_MAX_AGE={args.conn_max_age if args.conn_max_age is not None else 'default'}"
    )
    out(
        f"model: mlp {args.input_dim}-{'-'.join(map(str, training.config['hidden_sizes']))}"
        f"-{NUM_CLASSES}, {spec_parameters:,} parameters (formula {num_parameters:,}), "
        f"{spec_parameters * 4 / 2**20:.2f} MiB float32; {len(rounds)} rounds; setup {setup_seconds:.1f}s; "
        f"training wall time {run_seconds:.1f}s"
    )
    by_task = {str(r["task_id"]): r for r in agent_records if r.get("task_id")}
    updates_by_round: dict[int, list[Any]] = {}
    for u in updates:
        updates_by_round.setdefault(u.round_id, []).append(u)
    tasks_by_round: dict[int, list[Any]] = {}
    for t in tasks:
        tasks_by_round.setdefault(t.round_id, []).append(t)

    per_round: list[dict[str, float]] = []
    agent_stage: dict[str, list[float]] = {k: [] for k in AGENT_STAGES}
    for index, round_ in enumerate(rounds):
        opened = round_.opened_at.timestamp()
        closed = round_.closed_at.timestamp()
        completed = round_.completed_at.timestamp()
        nxt = rounds[index + 1] if index + 1 < len(rounds) else None
        end = nxt.opened_at.timestamp() if nxt is not None else completed
        round_tasks = tasks_by_round.get(round_.pk, [])
        records = [by_task[str(t.pk)] for t in round_tasks if str(t.pk) in by_task]
        round_updates = updates_by_round.get(round_.pk, [])
        received = [r["received"] for r in records]
        last_update = max(u.created_at.timestamp() for u in round_updates)
        fits = [r["fit_end"] - r["fit_start"] for r in records if "fit_end" in r]
        aggregation_seconds = float(round_.metrics.get("aggregation_seconds", float("nan")))
        event = events.aggregation_for_round(round_.pk) or {}
        worker_started = event.get("task-started")
        version = versions.get(round_.number)
        version_written = version.created_at.timestamp() if version is not None else float("nan")
        if worker_started is None:  # no events: attribute what cannot be split to queueing
            worker_started = version_written - aggregation_seconds
        compute_end = worker_started + aggregation_seconds
        row = {
            "round": round_.number,
            "attempts": round_.attempt,
            "total": end - opened,
            "fit": max(fits) if fits else 0.0,
            "delivery": max(received) - opened,
            "collect": last_update - max(received),
            "close": closed - last_update,
            "queue": worker_started - closed,
            "aggregate": aggregation_seconds,
            "write": version_written - compute_end,
            "open_next": end - version_written,
            "succeeded_after_open": (event["task-succeeded"] - end)
            if "task-succeeded" in event and nxt
            else float("nan"),
        }
        row["overhead"] = row["total"] - row["fit"]
        per_round.append(row)
        updates_by_task = {u.task_id: u for u in round_updates}
        for t in round_tasks:
            r = by_task.get(str(t.pk))
            u = updates_by_task.get(t.pk)
            if r is None or u is None or "upload_start" not in r:
                continue
            stored = u.created_at.timestamp()
            agent_stage["long-poll latency (round opened -> agent has task)"].append(r["received"] - opened)
            if t.delivered_at is not None:
                agent_stage["  of which server marks task delivered"].append(
                    t.delivered_at.timestamp() - opened
                )
            agent_stage["model download (GET, sha256, parse)"].append(r["download_end"] - r["download_start"])
            agent_stage["fit (no-op trainer)"].append(r["fit_end"] - r["fit_start"])
            agent_stage["delta + serialise (agent CPU)"].append(r["upload_start"] - r["fit_end"])
            agent_stage["upload + validation (POST until stored)"].append(stored - r["upload_start"])
            agent_stage["  POST response after stored"].append(r["upload_end"] - stored)
            agent_stage["waiting for the last agent (stored -> round closed)"].append(closed - stored)
            agent_stage["whole task at the agent (got task -> response)"].append(
                r["upload_end"] - r["received"]
            )

    out("")
    out(
        "Per round (seconds). The phases add up to the round time: round opened -> next round opened "
        "(last round: -> completed)."
    )
    out("")
    out(
        "| round | round time | training (slowest fit) | overhead beyond training "
        "| task delivery (opened -> last agent has task) "
        "| collecting (downloads, fits, uploads of all agents) "
        "| close (last update -> closed) | aggregation queueing (closed -> worker starts) "
        "| aggregation (aggregation_seconds) | version write | open next round |"
    )
    out("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    keys = [
        "total",
        "fit",
        "overhead",
        "delivery",
        "collect",
        "close",
        "queue",
        "aggregate",
        "write",
        "open_next",
    ]
    for row in per_round:
        out(f"| {row['round']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    medians = {k: statistics.median(r[k] for r in per_round) for k in keys}
    means = {k: statistics.fmean(r[k] for r in per_round) for k in keys}
    out("| median | " + " | ".join(f"{medians[k]:.3f}" for k in keys) + " |")
    out("| mean | " + " | ".join(f"{means[k]:.3f}" for k in keys) + " |")
    out("")
    out(
        f"Floor, measured in this run: {args.agents} concurrent clients (threads, httpx) each GET the last "
        f"version's blob ({floor['bytes'] / 2**20:.2f} MiB) and POST the same bytes back, to a plain stdlib "
        "static file server (ThreadingHTTPServer) on loopback, median of "
        f"{args.rounds} repetitions:"
    )
    out("")
    out("| what | seconds |")
    out("|---|---:|")
    out(f"| floor: all {args.agents} downloads + uploads of one round (wall) | {floor['round']:.3f} |")
    out(f"| floor: one download (median) | {floor['download']:.3f} |")
    out(f"| floor: one upload (median) | {floor['upload']:.3f} |")
    out(f"| fedsite: median overhead beyond training per round | {medians['overhead']:.3f} |")
    out(f"| fedsite: median overhead minus the floor's round | {medians['overhead'] - floor['round']:.3f} |")
    out("")
    share = {k: 100 * means[k] / means["total"] for k in keys}
    out(
        "Share of the mean round time: "
        + ", ".join(
            f"{label} {share[k]:.0f}%"
            for k, label in [
                ("delivery", "task delivery"),
                ("collect", "collecting"),
                ("close", "close"),
                ("queue", "aggregation queueing"),
                ("aggregate", "aggregation"),
                ("write", "version write"),
                ("open_next", "open next round"),
            ]
        )
    )
    out("")
    out(f"Per agent and task ({len(agent_stage['model download (GET, sha256, parse)'])} tasks), seconds:")
    out("")
    out("| stage | median | p90 | max |")
    out("|---|---:|---:|---:|")
    for name in AGENT_STAGES:
        med, p90, mx = _stats(agent_stage[name])
        out(f"| {name} | {med:.3f} | {p90:.3f} | {mx:.3f} |")
    before, after = cpu
    out("")
    out(
        f"CPU seconds used during the {run_seconds:.1f}s of training "
        f"({os.cpu_count()} cores = {(os.cpu_count() or 1) * run_seconds:.0f} core-seconds available):"
    )
    out("")
    out("| process | CPU s | per round |")
    out("|---|---:|---:|")
    for key in sorted(after, key=lambda k: -(after[k] - before.get(k, 0.0))):
        used = after[key] - before.get(key, 0.0)
        out(f"| {key} | {used:.1f} | {used / max(1, len(rounds)):.2f} |")
    return "\n".join(lines)


AGENT_STAGES = [
    "long-poll latency (round opened -> agent has task)",
    "  of which server marks task delivered",
    "model download (GET, sha256, parse)",
    "fit (no-op trainer)",
    "delta + serialise (agent CPU)",
    "upload + validation (POST until stored)",
    "  POST response after stored",
    "waiting for the last agent (stored -> round closed)",
    "whole task at the agent (got task -> response)",
]


if __name__ == "__main__":
    main()
