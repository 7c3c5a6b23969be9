"""Thousands of long-polling agents on one ASGI process while a training with 50 agents per round runs.

Starts the real stack on this machine -- ``manage.py serve`` (uvicorn, one process), a Celery worker with
embedded beat, Postgres and Redis -- registers ``--agents`` agents (rows written in bulk, tokens hashed as
the service does) and holds every one of them in a long-poll loop (``GET /api/v1/agent/tasks/next?wait=``)
from ``--client-processes`` asyncio + httpx processes, one connection per agent, 127.0.0.1 only. A FedAvg
training of a small ``logreg`` with min = max = ``--per-round`` clients runs ``--rounds`` rounds: the
agents picked each round get their task through the long-poll, download the model and upload a zero
update, then poll again. Everything is bounded in time (``--timeout``).

Reported: errors (any response that is not 200/201/204, any transport error), task delivery latency
(``Round.opened_at`` -> the agent has the task; p50, p99, max), the server's peak RSS, CPU seconds and
peak thread count, the load generator's CPU seconds (all client processes; it shares the machine), the
peak number of Postgres connections to the benchmark database (``pg_stat_activity``), sampled every 0.5 s,
and the kernel's listen-queue overflows during the run (``TcpExtListenOverflows``: handshakes dropped
because ``serve``'s accept queue was full; raise ``net.core.somaxconn`` if it is not 0).

Usage::

    .venv/bin/python bench/long_poll_load.py --agents 1000,5000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.round_overhead import PYTHON, Processes, free_port, run_psql, wait_healthy, wait_until  # noqa: E402

CELERY = str(REPO_ROOT / ".venv" / "bin" / "celery")
AGENT_PREFIX = "load-agent-"
INPUT_DIM, NUM_CLASSES = 16, 4


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (``TcpExtListenOverflows``,
    for the whole machine since boot; -1 where /proc/net/netstat does not say)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return -1
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", -1))
    return -1


def stack_env(pg: str, database: str, redis_db: int, workdir: Path, server_url: str) -> dict[str, str]:
    """The environment of a benchmark's server and worker: this one, plus the stack's settings."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fedsite.settings",
        "DJANGO_SECRET_KEY": "bench",
        "DATABASE_URL": f"{pg}/{database}",
        "REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
        "FEDSITE_VAR_DIR": str(workdir),
        "FEDSITE_MEDIA_ROOT": str(workdir / "media"),
        "FEDSITE_PUBLIC_BASE_URL": server_url,
    }


def fresh_stack(pg: str, database: str, env: dict[str, str]) -> None:
    """Drop and re-create ``database``, flush the Redis db of ``env["REDIS_URL"]``, and migrate."""
    import redis

    host = pg.rsplit("@", 1)[-1].split(":")[0]
    pg_port = pg.rsplit(":", 1)[-1]
    user = pg.split("//", 1)[1].split("@")[0]
    run_psql(["dropdb", "--if-exists", "-h", host, "-p", pg_port, "-U", user, database], env)
    run_psql(["createdb", "-h", host, "-p", pg_port, "-U", user, database], env)
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    migrate = [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"]
    subprocess.run(migrate, env=env, cwd=REPO_ROOT, check=True)


def register_agents(count: int, prefix: str) -> list[str]:
    """Write ``count`` agents in bulk (tokens hashed as the service does, seen now); return their tokens.

    Needs Django set up; closes this process's database connection afterwards.
    """
    import secrets

    from django.db import connection
    from django.utils import timezone

    from clients.models import Agent
    from clients.services import TOKEN_PREFIX, _hash_secret

    tokens = [TOKEN_PREFIX + secrets.token_urlsafe(32) for _ in range(count)]
    now = timezone.now()
    Agent.objects.bulk_create(
        [
            Agent(
                agent_id=f"{prefix}{i:05d}", token_hash=_hash_secret(t), token_prefix=t[:10], last_seen_at=now
            )
            for i, t in enumerate(tokens)
        ],
        batch_size=2000,
    )
    connection.close()
    return tokens


# ----------------------------------------------------------------------------------------------------------
# Client processes (``--client``): many agents, one asyncio loop, one connection each
# ----------------------------------------------------------------------------------------------------------
def _zero_update(parameters: list[dict[str, Any]]) -> bytes:
    """A zero update (safetensors, F32) in the layout the task names."""
    import numpy as np

    from flcore.parameters import to_bytes

    return to_bytes({p["name"]: np.zeros(p["shape"], dtype=np.float32) for p in parameters})


async def _agent_loop(client: Any, token: str, args: argparse.Namespace, stop_at: float, out: Any) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    while time.time() < stop_at:
        poll_started = time.time()
        try:
            response = await client.get(
                f"{args.server}/api/v1/agent/tasks/next", params={"wait": args.poll_wait}, headers=headers
            )
        except httpx.HTTPError as exc:
            out({"error": f"poll {type(exc).__name__}", "at": time.time()})
            await asyncio.sleep(1.0)
            continue
        if response.status_code == 204:
            continue
        if response.status_code != 200:
            out({"error": f"poll {response.status_code} {response.text[:120]}", "at": time.time()})
            await asyncio.sleep(1.0)
            continue
        received = time.time()
        task = response.json()
        record: dict[str, Any] = {
            "task_id": task["task_id"],
            "round": task["round"],
            "received": received,
            "poll_started": poll_started,
        }
        try:
            model = await client.get(f"{args.server}{task['model']['url']}", headers=headers)
            if model.status_code != 200:
                record["error"] = f"download {model.status_code}"
            else:
                meta = json.dumps({"num_examples": 10, "metrics": {}})
                upload = await client.post(
                    f"{args.server}{task['upload_url']}",
                    content=_zero_update(task["model"]["parameters"]),
                    headers={**headers, "Content-Type": "application/octet-stream", "X-Update-Meta": meta},
                )
                if upload.status_code not in (200, 201):
                    record["error"] = f"upload {upload.status_code} {upload.text[:120]}"
        except httpx.HTTPError as exc:
            record["error"] = f"task {type(exc).__name__}"
        out(record)


def client_main(args: argparse.Namespace) -> None:
    import httpx

    raise_file_limit()
    tokens = Path(args.tokens).read_text().split()
    sink = open(args.out, "a", buffering=1)  # noqa: SIM115 - one line per event, read by the parent

    def out(record: dict[str, Any]) -> None:
        sink.write(json.dumps(record) + "\n")

    # One TLS context for every client of this process (the server is plain http; httpx builds one per
    # client otherwise, loading the CA bundle each time: 10-20 ms of CPU and about 0.6 MiB per agent, which
    # at 1,250 agents per process kept the load generator's loop from sending its requests for tens of
    # seconds, and the server rightly closed connections that sent no headers in time).
    tls = ssl.create_default_context()

    async def one_agent(token: str, stop_at: float, index: int) -> None:
        # One client (and connection) per agent: httpx's pool scans its connections on every request, so
        # one pool shared by thousands of agents costs O(N) per request. Starts are spread over 10 s so
        # that thousands of connects do not overflow the server's listen backlog at once.
        await asyncio.sleep(10.0 * index / max(1, len(tokens)))
        timeout = httpx.Timeout(args.poll_wait + 30, connect=30)
        async with httpx.AsyncClient(timeout=timeout, verify=tls) as client:
            await _agent_loop(client, token, args, stop_at, out)

    async def main() -> None:
        print("READY", flush=True)
        start_line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        stop_at = float(start_line.strip() or 0)
        await asyncio.gather(*(one_agent(t, stop_at, i) for i, t in enumerate(tokens)))

    asyncio.run(main())


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
class Sampler:
    """Samples the server's RSS and threads, and the database's connections, every ``interval`` s."""

    def __init__(self, pid: int, database: str, interval: float = 0.5) -> None:
        self.pid, self.database, self.interval = pid, database, interval
        self.rss: list[int] = []
        self.threads: list[int] = []
        self.connections: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil
        import psycopg

        process = psutil.Process(self.pid)
        with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as db:
            while not self._stop.wait(self.interval):
                with contextlib.suppress(psutil.Error):
                    self.rss.append(process.memory_info().rss)
                    self.threads.append(process.num_threads())
                row = db.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.database,),
                ).fetchone()
                self.connections.append(int(row[0]) if row else 0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_one(args: argparse.Namespace, agents: int) -> dict[str, Any]:
    import httpx

    workdir = Path(tempfile.mkdtemp(prefix="long-poll-load-"))
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    env = stack_env(args.pg, args.database, args.redis_db, workdir, server_url)
    # One blob store for every N of this invocation: this process sets Django up once (the first N's
    # settings stay), and it writes each training's version 0 that the server then serves.
    env["FEDSITE_MEDIA_ROOT"] = os.environ["FEDSITE_MEDIA_ROOT"]
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["FEDSITE_METRICS_TOKEN"] = "bench-metrics-token"  # the bench reads the server's long-poll gauge
    os.environ.update(env)
    processes = Processes()
    try:
        fresh_stack(args.pg, args.database, env)

        import django

        django.setup()
        from django.db import connection

        from trainings.configuration import TrainingConfiguration
        from trainings.models import Round, Task, Training
        from trainings.services import training_create_and_start

        connection.connect()  # (a previous run's connection belongs to a dropped database)
        tokens = register_agents(agents, AGENT_PREFIX)

        server = processes.start(
            "server",
            [PYTHON, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            log=workdir / "server.log",
        )
        processes.start(
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
                "1",
                "-B",
                "-s",
                str(workdir / "celerybeat-schedule"),
            ],
            env=env,
            log=workdir / "worker.log",
        )

        wait_healthy(server, server_url, workdir / "server.log")
        overflows_before = listen_overflows()

        configuration = TrainingConfiguration.from_dict(
            {
                "name": f"long-poll load {agents}",
                "model_type": "logreg",
                "input_dim": INPUT_DIM,
                "num_classes": NUM_CLASSES,
                "min_clients_per_round": args.per_round,
                "max_clients_per_round": args.per_round,
                "max_rounds": args.rounds,
                "round_timeout_seconds": 120,
            }
        )
        token_files = []
        per_process = -(-agents // args.client_processes)
        clients = []
        for index, first in enumerate(range(0, agents, per_process)):
            token_file = workdir / f"tokens-{index}.txt"
            token_file.write_text("\n".join(tokens[first : first + per_process]))
            token_files.append(token_file)
        stop_at = time.time() + args.timeout
        for index, token_file in enumerate(token_files):
            clients.append(
                processes.start(
                    f"clients-{index}",
                    [
                        PYTHON,
                        __file__,
                        "--client",
                        "--server",
                        server_url,
                        "--tokens",
                        str(token_file),
                        "--out",
                        str(workdir / f"client-{index}.jsonl"),
                        "--poll-wait",
                        str(args.poll_wait),
                    ],
                    env=env,
                    log=workdir / f"client-{index}.log",
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in clients:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError(f"a client process did not start; see {workdir}")
        for proc in clients:
            assert proc.stdin is not None
            proc.stdin.write(f"{stop_at}\n")
            proc.stdin.flush()

        def polls_open() -> bool:
            """The server's own gauge (``fedsite_open_long_polls`` on /metrics) has nearly every agent."""
            try:
                text = httpx.get(
                    f"{server_url}/metrics",
                    headers={"Authorization": "Bearer bench-metrics-token"},
                    timeout=10,
                ).text
            except httpx.HTTPError:
                return False
            for line in text.splitlines():
                if line.startswith("fedsite_open_long_polls "):
                    return float(line.split()[1]) >= agents * 0.95
            return False

        with contextlib.suppress(TimeoutError):
            wait_until(polls_open, min(120, args.timeout), f"{agents} open long-polls", interval=1.0)
        sampler = Sampler(server.pid, args.database)
        sampler.start()
        cpu_before = _cpu_seconds(server.pid)
        clients_cpu_before = sum(_cpu_seconds(proc.pid) for proc in clients)
        run_started = time.time()
        training = training_create_and_start(configuration=configuration)
        connection.close()

        def finished() -> bool:
            done = Training.objects.get(pk=training.pk).is_terminal
            connection.close()
            return done

        with contextlib.suppress(TimeoutError):  # reported as not completed, with what was delivered
            wait_until(finished, max(10.0, stop_at - time.time()), f"training {training.pk} to finish", 0.5)
        run_seconds = time.time() - run_started
        cpu_used = _cpu_seconds(server.pid) - cpu_before
        clients_cpu = sum(_cpu_seconds(proc.pid) for proc in clients) - clients_cpu_before
        sampler.stop()
        training.refresh_from_db()
        opened = {r.number: r.opened_at.timestamp() for r in Round.objects.filter(training=training)}
        tasks_issued = Task.objects.filter(round__training=training).count()
        connection.close()
        # Stop the clients: end of their loop at the next poll return; bounded by a kill at teardown.
        for proc in clients:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        records: list[dict[str, Any]] = []
        for index, proc in enumerate(clients):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            path = workdir / f"client-{index}.jsonl"
            if path.exists():
                records.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
        latencies = [
            r["received"] - opened[r["round"]] for r in records if "received" in r and r["round"] in opened
        ]
        errors = [r["error"] for r in records if "error" in r]
        # before the training: while N agents connect and open their first polls
        warm_up_errors = sum(1 for r in records if "error" in r and r.get("at", run_started) < run_started)
        slow = sorted(
            (
                round(r["received"] - opened[r["round"]], 3),
                r["round"],
                round(r["poll_started"] - opened[r["round"]], 3),
            )
            for r in records
            if "received" in r and r["round"] in opened and r["received"] - opened[r["round"]] > 2.0
        )
        ordered = sorted(latencies)
        return {
            "agents": agents,
            "status": training.status,
            "rounds": len(opened),
            "tasks": tasks_issued,
            "delivered": len(latencies),
            "errors": len(errors),
            "warm_up_errors": warm_up_errors,
            # each kind with its count, most frequent first (a transport error's class, or the status)
            "error_kinds": collections.Counter(errors).most_common(8),
            "slow": slow[-10:],
            "p50": statistics.median(ordered) if ordered else float("nan"),
            "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
            if ordered
            else float("nan"),
            "max": ordered[-1] if ordered else float("nan"),
            "rss_mib": max(sampler.rss, default=0) / 2**20,
            "threads": max(sampler.threads, default=0),
            "cpu": cpu_used,
            "clients_cpu": clients_cpu,
            "run_seconds": run_seconds,
            "db_connections": max(sampler.connections, default=0),
            "listen_overflows": listen_overflows() - overflows_before,
        }
    finally:
        with contextlib.suppress(Exception):  # this process's pooled connections: the next N drops the db
            from django.db import connection as db_connection

            db_connection.close()
            db_connection.close_pool()
        processes.stop_all()
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="1000,5000,10000", help="comma-separated numbers of agents")
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll-wait", type=float, default=30.0)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--database", default="fedsite_bench")
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per N, at most")
    parser.add_argument("--keep-logs", action="store_true", help="keep the server, worker and client logs")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with contextlib.suppress(KeyboardInterrupt):
            client_main(args)
        return
    limit = raise_file_limit()
    results = []
    media = tempfile.mkdtemp(prefix="long-poll-load-media-")  # see run_one
    os.environ["FEDSITE_MEDIA_ROOT"] = media
    try:
        for n in [int(x) for x in args.agents.split(",") if x.strip()]:
            if n + 1000 > limit:
                print(f"skipping N={n}: open-file limit {limit}", file=sys.stderr)
                continue
            results.append(run_one(args, n))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        subprocess.run(["rm", "-rf", media], check=False)
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared); "
        f"one `manage.py serve` process; {args.per_round} agents per round, {args.rounds} rounds; "
        f"long-poll wait {args.poll_wait:.0f}s; {args.client_processes} client processes; "
        f"open-file limit {limit}"
    )
    print("")
    print(
        "| N agents polling | training | errors (of which before the training) | tasks delivered "
        "| delivery p50 s | p99 s | max s "
        "| server RSS peak MiB | server threads peak | server CPU s | load generator CPU s | run s "
        "| DB connections peak | listen overflows |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['agents']:,} | {r['status']} ({r['rounds']} rounds) "
            f"| {r['errors']} ({r['warm_up_errors']}) "
            f"| {r['delivered']}/{r['tasks']} "
            f"| {r['p50']:.3f} | {r['p99']:.3f} | {r['max']:.3f} | {r['rss_mib']:.0f} | {r['threads']} "
            f"| {r['cpu']:.1f} | {r['clients_cpu']:.1f} | {r['run_seconds']:.1f} | {r['db_connections']} "
            f"| {r['listen_overflows']} |"
        )
    for r in results:
        if r["error_kinds"]:
            print(f"N={r['agents']}: errors {r['error_kinds']}")
        if r["slow"]:
            print(f"N={r['agents']}: deliveries over 2 s (latency, round, poll start - opened): {r['slow']}")


if __name__ == "__main__":
    main()
