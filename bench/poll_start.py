"""What one idle long-poll costs the server: CPU seconds per poll that starts and ends with no task.

An idle agent's poll (``GET /api/v1/agent/tasks/next?wait=W``, answered 204 after W seconds) is what
thousands of waiting agents cost a server between rounds: at 10,000 agents and ``wait=30`` one process
starts about 330 a second. This bench isolates that cost: it starts ``manage.py serve`` (uvicorn, one
process) on Postgres and Redis with ``--agents`` registered agents and no training, then keeps
``--connections`` keep-alive connections busy with polls of ``wait=--wait`` seconds (each connection
cycles through its own agents' tokens, so tokens repeat only after ``agents / connections`` polls of
that connection), for ``--seconds`` seconds per measurement. The client is raw asyncio streams, so the
load generator's own cost stays small next to the server's.

Reported per run: polls answered, errors (any status but 204), server CPU seconds (from /proc, user +
system), CPU milliseconds per poll, polls per second, and the server's database statements per poll
(``pg_stat_database.xact_commit`` + ``xact_rollback`` of the benchmark database: one per autocommit
statement). ``--runs`` repeats the measurement on the same server (the first is a warm-up for caches).

Usage::

    .venv/bin/python bench/poll_start.py --agents 5000 --connections 200 --wait 0 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.long_poll_load import fresh_stack, raise_file_limit, register_agents, stack_env  # noqa: E402
from bench.round_overhead import PYTHON, Processes, free_port, wait_healthy  # noqa: E402

AGENT_PREFIX = "poll-agent-"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _connection(
    port: int, tokens: list[str], wait: float, stop_at: float, counts: dict[str, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    index = 0
    try:
        while time.monotonic() < stop_at:
            token = tokens[index % len(tokens)]
            index += 1
            writer.write(
                (
                    f"GET /api/v1/agent/tasks/next?wait={wait:g} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {token}\r\n\r\n"
                ).encode()
            )
            status = await _read_response(reader)
            counts["polls"] += 1
            if status != 204:
                counts["errors"] += 1
                counts.setdefault(f"status {status}", 0)
                counts[f"status {status}"] += 1
    finally:
        writer.close()


async def _load(
    port: int, tokens: list[str], connections: int, wait: float, seconds: float
) -> dict[str, int]:
    counts = {"polls": 0, "errors": 0}
    stop_at = time.monotonic() + seconds
    shares = [tokens[i::connections] for i in range(connections)]
    await asyncio.gather(*(_connection(port, share, wait, stop_at, counts) for share in shares))
    return counts


def _transactions(env: dict[str, str], database: str) -> int:
    result = subprocess.run(
        [
            "psql",
            env["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres",
            "-tAc",
            f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{database}'",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--wait", type=float, default=0.0, help="the polls' wait=, in seconds")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database", default="fedsite_bench_poll")
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--redis-db", type=int, default=13)
    args = parser.parse_args()
    raise_file_limit()

    workdir = Path(tempfile.mkdtemp(prefix="poll-start-"))
    port = free_port()
    env = stack_env(args.pg, args.database, args.redis_db, workdir, f"http://127.0.0.1:{port}")
    os.environ.update(env)
    fresh_stack(args.pg, args.database, env)

    import django

    django.setup()
    tokens = register_agents(args.agents, AGENT_PREFIX)

    processes = Processes()
    try:
        server = processes.start(
            "server",
            [PYTHON, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            log=workdir / "server.log",
        )

        wait_healthy(server, f"http://127.0.0.1:{port}", workdir / "server.log")
        rows = []
        for run in range(1, args.runs + 1):
            cpu0, xact0 = _cpu_seconds(server.pid), _transactions(env, args.database)
            started = time.monotonic()
            counts = asyncio.run(_load(port, tokens, args.connections, args.wait, args.seconds))
            elapsed = time.monotonic() - started
            cpu, xact = _cpu_seconds(server.pid) - cpu0, _transactions(env, args.database) - xact0
            polls = max(counts["polls"], 1)
            rows.append((run, counts, cpu, elapsed, xact / polls))
            kinds = ", ".join(f"{k} {v}" for k, v in counts.items() if k.startswith("status"))
            print(
                f"run {run}: {counts['polls']} polls, {counts['errors']} errors"
                f"{' (' + kinds + ')' if kinds else ''}, server {cpu:.2f} CPU-s = "
                f"{1000 * cpu / polls:.2f} ms/poll, {counts['polls'] / elapsed:.0f} polls/s, "
                f"{xact / polls:.2f} statements/poll",
                flush=True,
            )
        load = os.getloadavg()
        print(
            f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
            f"{args.agents} agents, {args.connections} connections, wait={args.wait:g}, "
            f"{args.seconds:g} s per run\n"
        )
        print(
            "| run | polls | errors | server CPU s | CPU ms per poll | polls per s | DB statements per poll |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for run, counts, cpu, elapsed, per_poll in rows:
            polls = max(counts["polls"], 1)
            print(
                f"| {run} | {counts['polls']} | {counts['errors']} | {cpu:.2f} | {1000 * cpu / polls:.2f} | "
                f"{counts['polls'] / elapsed:.0f} | {per_poll:.2f} |"
            )
    finally:
        processes.stop_all()


if __name__ == "__main__":
    main()
