"""Command line of the agent: ``python -m fedagent run ...`` and ``python -m fedagent enroll ...``.

``run`` loads this agent's private shard of a reference data set (:func:`flcore.data.client_split`, the
same partition in every process given the same seed) and works on tasks until stopped; ``enroll`` trades
an enrollment key for a token and prints it as JSON.

Simulation options of ``run``, for robustness and systems-heterogeneity experiments, all off by default:
``--attack`` makes the agent upload poisoned updates (:mod:`fedagent.attacks`; it logs a WARNING at start
and for every poisoned update), ``--straggle-probability`` makes it a straggler on some tasks
(:mod:`fedagent.stragglers`), doing partial work or, with ``--drop-stragglers``, giving the task back.

Local differential privacy (:mod:`fedagent.local_dp`), off unless asked or required by the server:
``--local-dp gaussian|laplace --local-dp-clip C`` with ``--local-dp-noise-multiplier z`` or
``--local-dp-epsilon E [--local-dp-delta D]`` clips every delta and adds noise before upload. The hooks are
always installed, so a task whose config carries ``"local_dp"`` is noised as the server says (overriding
these flags) or given back; ``--attack`` and ``--local-dp`` together are refused (exit 2).

Exit codes (also in ``docs/agent-protocol.md``):

====  =================================================================================================
0     normal end: ``--max-tasks`` reached, idle, training done, or SIGTERM/SIGINT
1     unexpected error (a bug: please report it with the log)
2     invalid command line
3     the server refused the credentials: 401 (bad token) or 403 (agent disabled, bad enrollment key)
4     conflict: the agent id is already enrolled (409)
5     the server could not be reached, or kept answering 5xx, after all retries
6     the local data could not be loaded or partitioned (bad --dataset, --mnist-path, --partition...)
====  =================================================================================================
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

from fedagent._version import __version__
from fedagent.attacks import (
    DEFAULT_NUM_ESTIMATES,
    DEFAULT_SCALING_FACTOR,
    AttackConfig,
    AttackHooks,
    AttackKind,
    attack_hooks,
)
from fedagent.client import ENV_ENROLLMENT_KEY, ENV_SERVER, ENV_TOKEN, FederatedClient, RunStats
from fedagent.errors import AgentApiError, AgentConnectionError, AgentError
from fedagent.http import AgentHttpClient
from fedagent.local_dp import MECHANISMS as LOCAL_DP_MECHANISMS
from fedagent.local_dp import LocalDpConfig, LocalDpHooks, local_dp_hooks
from fedagent.logs import ContextLogger, configure_logging
from fedagent.stragglers import StragglerPolicy

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_CONFLICT = 4
EXIT_UNREACHABLE = 5
EXIT_DATA = 6

#: ``fedagent.secagg.DROP_PHASES``, repeated so that building the parser does not import fedagent.secagg
#: (cryptography and flcore.secagg), which only an agent given ``--state-dir`` needs; a test keeps them equal.
SECAGG_DROP_PHASES = ("advertise", "share", "upload")

logger = logging.getLogger("fedagent.cli")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m fedagent``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedagent",
        description="A fedsite federated-learning agent (protocol v1).",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 usage, 3 credentials refused, 4 agent id taken, "
        "5 server unreachable, 6 local data error.",
    )
    parser.add_argument("--version", action="version", version=f"fedagent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=_env(ENV_SERVER),
        required=_env(ENV_SERVER) is None,
        help=f"server root URL, e.g. http://localhost:8000 (default ${ENV_SERVER})",
    )
    common.add_argument("--agent-id", required=True, help="this agent's id: 1-64 of [A-Za-z0-9_.-]")
    common.add_argument(
        "--enrollment-key",
        default=_env(ENV_ENROLLMENT_KEY),
        help=f"enroll with this key when there is no token (default ${ENV_ENROLLMENT_KEY})",
    )
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    common.add_argument("--log-format", default="text", choices=["text", "json"])
    common.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds (default 30)")
    common.add_argument(
        "--max-attempts",
        type=int,
        default=6,
        help="attempts per HTTP request, retries included (default 6); uploads retry until the task deadline",
    )

    run = commands.add_parser("run", parents=[common], help="work on tasks until stopped")
    run.add_argument("--token", default=_env(ENV_TOKEN), help=f"bearer token (default ${ENV_TOKEN})")
    run.add_argument(
        "--token-file",
        type=Path,
        help="read the token from this file; after enrolling, write it there (mode 0600)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        default=_env("FEDAGENT_STATE_DIR"),
        help="keep the agent's Ed25519 identity key here (mode 0600; created if absent) and take part in "
        "secure-aggregation trainings (default $FEDAGENT_STATE_DIR; none: such tasks are given back)",
    )
    run.add_argument("--dataset", required=True, choices=["digits", "mnist"])
    run.add_argument("--mnist-path", help="MNIST .npz file for --dataset mnist")
    run.add_argument("--num-clients", type=int, required=True, help="number of agents sharing the data set")
    run.add_argument("--client-index", type=int, required=True, help="this agent's shard, 0..num-clients-1")
    run.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "shards"])
    run.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    run.add_argument("--shards-per-client", type=int, default=2, help="for --partition shards (default 2)")
    run.add_argument("--seed", type=int, required=True, help="partition seed, the same for every agent")
    run.add_argument("--eval-fraction", type=float, default=0.2, help="held-out fraction (default 0.2)")
    run.add_argument("--max-tasks", type=int, help="exit 0 after this many tasks")
    run.add_argument("--stop-when-idle-for", type=float, help="exit 0 after this many seconds without a task")
    run.add_argument(
        "--exit-when-training-done",
        metavar="TRAINING_ID",
        help="when idle, check this training's status and exit 0 once it is over",
    )
    run.add_argument("--poll-wait", type=float, default=30.0, help="long-poll seconds, 0-60 (default 30)")
    run.add_argument(
        "--wait-for-server",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="for an agent started with its server: try connecting every 0.25 s at most for up to this "
        "long before the usual retries (default 0: the usual retries only)",
    )
    run.add_argument("--heartbeat-interval", type=float, help="seconds; default: the server's")
    simulation = run.add_argument_group(
        "simulation (experiments only; off by default)",
        "Make this agent misbehave on purpose: poisoned updates (--attack) or straggling.",
    )
    simulation.add_argument(
        "--attack",
        choices=[kind.value for kind in AttackKind],
        help="upload poisoned updates: sign_flip (-scale*delta), gaussian (N(0, sigma^2) noise), "
        "scaling (scale*delta) or alie (Baruch et al. 2019: mu - z*sigma, estimated from own data)",
    )
    simulation.add_argument(
        "--attack-scale",
        type=float,
        help=f"sign_flip magnitude (default 1) or scaling factor (default {DEFAULT_SCALING_FACTOR:g})",
    )
    simulation.add_argument(
        "--attack-sigma", type=float, default=1.0, help="gaussian noise std per coordinate (default 1)"
    )
    simulation.add_argument("--alie-num-agents", type=int, help="alie: n, agents per round")
    simulation.add_argument("--alie-num-attackers", type=int, help="alie: f, attackers per round")
    simulation.add_argument(
        "--alie-num-estimates",
        type=int,
        default=DEFAULT_NUM_ESTIMATES,
        help=f"alie: honest deltas trained on disjoint parts of own data (default {DEFAULT_NUM_ESTIMATES})",
    )
    simulation.add_argument(
        "--attack-seed", type=int, help="seed of the attack's noise (default: derived from --seed and the id)"
    )
    simulation.add_argument(
        "--attack-after",
        type=int,
        default=0,
        metavar="N",
        help="upload N honest updates first, then attack (an agent turning malicious; default 0)",
    )
    simulation.add_argument(
        "--attack-for",
        type=int,
        metavar="M",
        help="poison only M updates, then be honest again (default: every one after --attack-after)",
    )
    simulation.add_argument(
        "--straggle-probability",
        type=float,
        default=0.0,
        help="on each task, with this probability, do only part of the local work (default 0)",
    )
    simulation.add_argument(
        "--drop-stragglers",
        action="store_true",
        help="a straggler gives the task back (POST fail) instead of uploading partial work (FedAvg)",
    )

    simulation.add_argument(
        "--secagg-drop-after",
        choices=list(SECAGG_DROP_PHASES),
        help="tests only: stop answering secure-aggregation tasks after this phase, like a crashed agent",
    )
    simulation.add_argument(
        "--secagg-record-dir",
        type=Path,
        help="tests only: write each clipped delta and its weight here (it is what the server must not see)",
    )
    privacy = run.add_argument_group(
        "local differential privacy",
        "Clip each delta and add noise before it leaves the agent. A training that requires local DP sends "
        "its own setting in the task config, which overrides these flags.",
    )
    privacy.add_argument("--local-dp", choices=list(LOCAL_DP_MECHANISMS), help="noise mechanism")
    privacy.add_argument("--local-dp-clip", type=float, help="clip norm C (L2 for gaussian, L1 for laplace)")
    privacy.add_argument(
        "--local-dp-noise-multiplier", type=float, help="z: noise stddev (gaussian) or scale (laplace) z*C"
    )
    privacy.add_argument(
        "--local-dp-epsilon", type=float, help="calibrate z for this epsilon per upload (sensitivity 2C)"
    )
    privacy.add_argument("--local-dp-delta", type=float, help="delta of the calibration (gaussian only)")

    enroll = commands.add_parser("enroll", parents=[common], help="enroll and print the token as JSON")
    enroll.add_argument("--capabilities", default="{}", help="JSON object describing this agent")
    return parser


def _exit_code_for(exc: AgentError) -> int:
    if isinstance(exc, AgentApiError):
        if exc.status in {401, 403}:
            return EXIT_AUTH
        if exc.status == 409:
            return EXIT_CONFLICT
        if exc.status >= 500 or exc.status == 429:
            return EXIT_UNREACHABLE
        return EXIT_ERROR
    if isinstance(exc, AgentConnectionError):
        return EXIT_UNREACHABLE
    return EXIT_ERROR


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _print_summary(stats: RunStats, agent_id: str) -> None:
    table = Table(title=f"fedagent {agent_id}: {stats.stop_reason or 'stopped'}")
    table.add_column("tasks", justify="right")
    table.add_column("uploaded", justify="right")
    table.add_column("closed", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("rejected", justify="right")
    table.add_column("abandoned", justify="right")
    table.add_column("empty polls", justify="right")
    table.add_column("seconds", justify="right")
    table.add_row(
        str(stats.tasks_received),
        str(stats.tasks_uploaded),
        str(stats.tasks_closed),
        str(stats.tasks_failed),
        str(stats.tasks_rejected),
        str(stats.tasks_abandoned),
        str(stats.empty_polls),
        f"{stats.elapsed_seconds:.1f}",
    )
    Console(stderr=True).print(table)


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    path: Path | None = args.token_file
    if path is not None and path.exists():
        return path.read_text(encoding="utf-8").strip() or None
    return None


def _write_token(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")


def _simulation_hooks(
    args: argparse.Namespace, log: ContextLogger
) -> tuple[AttackHooks | None, StragglerPolicy | None]:
    """The opt-in attack and straggler of ``run`` (raises ValueError, exit 2, on bad values)."""
    import hashlib

    import numpy as np

    hooks = None
    if args.attack is not None:
        config = AttackConfig(
            args.attack,
            scale=args.attack_scale,
            sigma=args.attack_sigma,
            num_agents=args.alie_num_agents,
            num_attackers=args.alie_num_attackers,
            num_estimates=args.alie_num_estimates,
            honest_first=args.attack_after,
            poisoned_count=args.attack_for,
        )
        seed = args.attack_seed
        if seed is None:
            digest = hashlib.sha256(f"{args.seed}:{args.agent_id}:attack".encode()).digest()
            seed = int.from_bytes(digest[:8], "big")
        hooks = attack_hooks(config, rng=np.random.default_rng(seed), logger=log)
        log.warning(
            "ATTACK SIMULATION ENABLED: this agent will upload poisoned updates (%s). "
            "Use it only against a test server.",
            config.describe(),
        )
    elif (
        args.attack_scale is not None
        or args.alie_num_agents is not None
        or args.alie_num_attackers is not None
        or args.attack_after
        or args.attack_for is not None
    ):
        raise ValueError("--attack-scale, --attack-after, --attack-for and --alie-* need --attack.")
    straggler = None
    if args.straggle_probability or args.drop_stragglers:
        straggler = StragglerPolicy(args.straggle_probability, drop=args.drop_stragglers)
        log.warning(
            "straggler simulation enabled: probability %g per task, %s",
            straggler.probability,
            "giving the task back" if straggler.drop else "uploading partial work",
        )
    return hooks, straggler


def _local_dp_config(args: argparse.Namespace) -> LocalDpConfig | None:
    """The agent's own local DP setting from ``--local-dp*`` (raises ValueError, exit 2, on bad values)."""
    others = (args.local_dp_clip, args.local_dp_noise_multiplier, args.local_dp_epsilon, args.local_dp_delta)
    if args.local_dp is None:
        if any(value is not None for value in others):
            raise ValueError(
                "--local-dp-clip, --local-dp-noise-multiplier, --local-dp-epsilon and "
                "--local-dp-delta need --local-dp."
            )
        return None
    if args.local_dp_clip is None:
        raise ValueError("--local-dp needs --local-dp-clip.")
    if args.local_dp_noise_multiplier is not None:
        if args.local_dp_epsilon is not None or args.local_dp_delta is not None:
            raise ValueError(
                "Give either --local-dp-noise-multiplier or --local-dp-epsilon (and -delta), not both."
            )
        return LocalDpConfig(args.local_dp, args.local_dp_clip, args.local_dp_noise_multiplier)
    if args.local_dp_epsilon is None:
        raise ValueError("--local-dp needs --local-dp-noise-multiplier or --local-dp-epsilon.")
    return LocalDpConfig.calibrated(
        args.local_dp, args.local_dp_clip, args.local_dp_epsilon, args.local_dp_delta
    )


def _local_dp_hooks(args: argparse.Namespace, log: ContextLogger, attack: AttackHooks | None) -> LocalDpHooks:
    """Local DP hooks, always installed so that a task requiring local DP is honoured.

    Refuses ``--attack`` together with ``--local-dp`` (ValueError, exit 2). The noise generator is seeded
    from the operating system's entropy.
    """
    import secrets

    import numpy as np

    config = _local_dp_config(args)
    if config is not None and attack is not None:
        raise ValueError("Refusing to combine --attack with --local-dp: choose one.")
    hooks = local_dp_hooks(
        config,
        rng=np.random.default_rng(secrets.randbits(128)),
        trainer_factory=attack.trainer_factory if attack else None,
        attack=attack.update_transform if attack else None,
        logger=log,
    )
    if config is not None:
        log.info(
            "local DP enabled: %s, noise stddev %.4g per coordinate", config.describe(), config.noise_stddev
        )
    return hooks


def _command_run(args: argparse.Namespace) -> int:
    from flcore.data import client_split
    from flcore.errors import FlcoreError

    log = ContextLogger(logger, {"agent_id": args.agent_id})
    hooks, straggler = _simulation_hooks(args, log)
    privacy = _local_dp_hooks(args, log, hooks)
    try:
        x_train, y_train, x_eval, y_eval = client_split(
            args.dataset,
            num_clients=args.num_clients,
            client_index=args.client_index,
            scheme=args.partition,
            alpha=args.alpha,
            shards_per_client=args.shards_per_client,
            seed=args.seed,
            eval_fraction=args.eval_fraction,
            mnist_path=args.mnist_path,
        )
    except (FlcoreError, OSError) as exc:
        log.error("could not load the local data: %s", exc)
        return EXIT_DATA
    log.info(
        "loaded %s shard %d/%d (%s): %d train, %d eval examples",
        args.dataset,
        args.client_index,
        args.num_clients,
        args.partition,
        len(y_train),
        len(y_eval),
    )
    token = _read_token(args)
    secagg = None
    if args.state_dir is not None:
        from fedagent.secagg import SecAggParty, load_or_create_identity_key

        try:
            identity_key = load_or_create_identity_key(args.state_dir)
        except (OSError, ValueError) as exc:
            log.error("could not load or create the identity key in --state-dir %s: %s", args.state_dir, exc)
            return EXIT_USAGE
        secagg = SecAggParty(
            identity_key=identity_key,
            drop_after=args.secagg_drop_after,
            record_dir=args.secagg_record_dir,
        )
    elif args.secagg_drop_after or args.secagg_record_dir:
        log.error("--secagg-drop-after and --secagg-record-dir need --state-dir")
        return EXIT_USAGE
    client = FederatedClient(
        agent_id=args.agent_id,
        server=args.server,
        token=token,
        enrollment_key=args.enrollment_key,
        eval_fraction=args.eval_fraction,
        poll_wait=args.poll_wait,
        heartbeat_interval=args.heartbeat_interval,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        update_transform=privacy.update_transform,  # applies the attack (if any) when no local DP is in force
        trainer_factory=privacy.trainer_factory,
        straggler=straggler,
        secagg=secagg,
        capabilities={
            "dataset": args.dataset,
            "partition": args.partition,
            "num_clients": args.num_clients,
            "client_index": args.client_index,
        },
    )
    with client:
        client.add_dataset(args.dataset, x_train, y_train, split="train")
        if len(y_eval):
            client.add_dataset(args.dataset, x_eval, y_eval, split="eval")
        client.connect(wait_for_server=max(0.0, args.wait_for_server))
        if token is None and args.token_file is not None and client.token:
            _write_token(args.token_file, client.token)
            log.info("token written to %s", args.token_file)
        stats = client.run(
            max_tasks=args.max_tasks,
            stop_when_idle_for=args.stop_when_idle_for,
            exit_when_training_done=args.exit_when_training_done,
        )
    _print_summary(stats, args.agent_id)
    return EXIT_OK


def _command_enroll(args: argparse.Namespace) -> int:
    if not args.enrollment_key:
        logger.error("enroll needs --enrollment-key (or $%s)", ENV_ENROLLMENT_KEY)
        return EXIT_USAGE
    try:
        capabilities = json.loads(args.capabilities)
    except ValueError as exc:
        logger.error("--capabilities is not JSON: %s", exc)
        return EXIT_USAGE
    with AgentHttpClient(args.server, timeout=args.timeout, max_attempts=args.max_attempts) as http:
        reply = http.enroll(args.enrollment_key, args.agent_id, capabilities)
    print(json.dumps(reply, indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:
        parser.error(str(exc))
    # Until FederatedClient.run installs its own handlers (and after it restores these), a SIGTERM is a
    # clean exit like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        if args.command == "run":
            return _command_run(args)
        return _command_enroll(args)
    except KeyboardInterrupt:
        logger.info("interrupted; exiting", extra={"agent_id": args.agent_id})
        return EXIT_OK
    except ValueError as exc:  # invalid option values caught by the SDK (agent id, poll wait...)
        logger.error("%s", exc, extra={"agent_id": args.agent_id})
        return EXIT_USAGE
    except AgentError as exc:
        logger.error("%s", exc, extra={"agent_id": args.agent_id})
        return _exit_code_for(exc)
    except Exception:
        logger.exception("unexpected error", extra={"agent_id": args.agent_id})
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout.flush()
