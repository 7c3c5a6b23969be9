"""``manage.py validate_privacy``: check the DP mechanisms, the accounting and the released rounds.

Sections (``--sections``, default all; see :mod:`privacy.validation` for the statistics):

- ``mechanisms``: flcore's Gaussian and Laplace noise and ``CentralDp.noised_mean`` against their nominal
  distributions (Kolmogorov-Smirnov and exact scale tests, Bonferroni at family-wise alpha 1e-3);
- ``accountants``: our RDP and PLD epsilon beside the PRV accountant's bounds (needs the optional
  ``prv-accountant``: ``pip install -r requirements/privacy-validation.txt``);
- ``audit``: an empirical lower bound on epsilon from a canary attack on the server's central-DP release,
  which must not exceed the accounted epsilon;
- ``distributed``: the summed Skellam shares of the agents' real encoding path against ``Sk(n mu)``, and the
  Skellam accounting (calibration tight, ledger composition, RDP at least the Gaussian's).

``--quick`` runs smaller samples and grids (for tests); ``--break-noise`` switches flcore's noise off in
this process to show that the checks fail; ``--table`` prints epsilon for a grid of (q, z, rounds) and the
noise multipliers the privacy levels calibrate to (tables in Markdown). Exits non-zero (CommandError) if
any check fails.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from privacy.accounting import calibrate_noise_multiplier
from privacy.levels import LEVELS
from privacy.validation import (
    FAMILY_ALPHA,
    FULL_ACCOUNTANT_GRID,
    QUICK_ACCOUNTANT_GRID,
    SECTIONS,
    AccountantReport,
    AuditResult,
    DistributedReport,
    MechanismCheck,
    check_accountants,
    check_distributed,
    check_mechanisms,
    distributed_epsilon_table,
    epsilon_grid,
    noise_switched_off,
    run_audit,
)

TABLE_Q = (0.01, 0.05, 0.1, 0.5, 1.0)
TABLE_Z = (0.8, 1.0, 1.5, 2.0, 5.0, 10.0)
TABLE_ROUNDS = (10, 100, 1000)
TABLE_DELTA = 1e-5
LEVEL_SETTINGS = ((1.0, 20), (0.5, 50), (0.1, 100), (0.01, 1000))
"""(q, planned rounds) for which ``--table`` calibrates each level's noise multiplier."""


def _verdict(passed: bool) -> str:
    return "[green]PASS[/green]" if passed else "[bold red]FAIL[/bold red]"


def _float(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


class Command(BaseCommand):
    help = "Validate the DP noise, the privacy accounting and an empirical audit; non-zero exit on failure."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--sections",
            default=None,
            help=f"Comma-separated sections to run, of {', '.join(SECTIONS)} (default all).",
        )
        parser.add_argument("--quick", action="store_true", help="Smaller samples, grid and audit (tests).")
        parser.add_argument(
            "--break-noise",
            action="store_true",
            help="Switch flcore's noise off in this process (zeros): the checks must then FAIL.",
        )
        parser.add_argument("--seed", type=int, default=0, help="Seed of every generator (default 0).")
        parser.add_argument(
            "--trials", type=int, default=None, help="Audit trials per world (default 5000, quick 500)."
        )
        parser.add_argument(
            "--audit-noise-multiplier",
            type=float,
            default=2.0,
            help="Noise multiplier z of the audited round (default 2.0).",
        )
        parser.add_argument(
            "--distributed-table",
            action="store_true",
            help="Print epsilon against the per-agent Skellam mu for a worked distributed-DP example "
            "(Markdown), then stop unless --sections is given too.",
        )
        parser.add_argument(
            "--table",
            action="store_true",
            help="Print epsilon for a grid of (q, z, rounds) and each level's calibrated z (Markdown), "
            "then stop unless --sections is given too.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        console = Console(file=self.stdout, width=150, highlight=False, soft_wrap=False)
        self.console = console
        chosen = options["sections"]
        sections = [s.strip() for s in (chosen or ",".join(SECTIONS)).split(",") if s.strip()]
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise CommandError(f"Unknown sections {unknown}; choose from {list(SECTIONS)}.")
        if options["table"] or options["distributed_table"]:
            if options["table"]:
                self._print_tables()
            if options["distributed_table"]:
                self._print_distributed_table()
            if chosen is None:
                return
        quick = options["quick"]
        seed = options["seed"]
        failures: list[str] = []
        if options["break_noise"]:
            console.print(
                "[bold yellow]--break-noise: flcore's Gaussian and Laplace samplers return zeros in this "
                "process; every check below that sees noise must FAIL.[/bold yellow]"
            )
        breaker = noise_switched_off() if options["break_noise"] else contextlib.nullcontext()
        with breaker:
            if "mechanisms" in sections:
                checks = check_mechanisms(samples=20_000 if quick else 200_000, seed=seed)
                self._print_mechanisms(checks)
                if not all(c.passed for c in checks):
                    failures.append("mechanisms")
            if "accountants" in sections:
                report = self._run_accountants(quick)
                self._print_accountants(report)
                if not report.passed:
                    failures.append("accountants")
            if "audit" in sections:
                trials = options["trials"] or (500 if quick else 5000)
                result = self._run_audit(trials, seed, options["audit_noise_multiplier"])
                self._print_audit(result)
                if not result.passed:
                    failures.append("audit")
            if "distributed" in sections:
                distributed = check_distributed(trials=5 if quick else 100, seed=seed)
                self._print_distributed(distributed)
                if not distributed.passed:
                    failures.append("distributed")
        summary = Table(title="privacy validation", box=box.SIMPLE_HEAVY)
        summary.add_column("section")
        summary.add_column("verdict")
        for section in sections:
            summary.add_row(section, _verdict(section not in failures))
        console.print(summary)
        if failures:
            raise CommandError(f"Privacy validation FAILED in: {', '.join(failures)}.")
        console.print("[green]All privacy checks passed.[/green]")

    # ---- sections ------------------------------------------------------------------------------------

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )

    def _run_accountants(self, quick: bool) -> AccountantReport:
        grid = QUICK_ACCOUNTANT_GRID if quick else FULL_ACCOUNTANT_GRID
        with self._progress() as progress:
            task = progress.add_task("accountants", total=len(grid))
            return check_accountants(grid, progress=lambda: progress.advance(task))

    def _run_audit(self, trials: int, seed: int, noise_multiplier: float) -> AuditResult:
        with self._progress() as progress:
            task = progress.add_task("audit trials", total=2 * trials)
            return run_audit(
                trials=trials,
                seed=seed,
                noise_multiplier=noise_multiplier,
                progress=lambda n: progress.advance(task, n),
            )

    # ---- output --------------------------------------------------------------------------------------

    def _print_mechanisms(self, checks: list[MechanismCheck], heading: str = "1. Mechanisms") -> None:
        table = Table(
            title=(
                f"{heading}: seeded samples vs nominal distribution (family-wise alpha {FAMILY_ALPHA:g}, "
                f"Bonferroni: {checks[0].alpha:.2g} per test)"
            ),
            box=box.SIMPLE_HEAVY,
        )
        for column in ("noise source", "distribution", "test", "n", "scale exp.", "scale obs.", "statistic"):
            table.add_column(column, justify="left" if column in ("noise source", "test") else "right")
        table.add_column("p-value", justify="right")
        table.add_column("verdict")
        for check in checks:
            table.add_row(
                check.source,
                check.distribution,
                check.test,
                str(check.samples),
                f"{check.expected_scale:.5g}",
                f"{check.observed_scale:.5g}",
                f"{check.statistic:.5g}",
                f"{check.p_value:.3g}",
                _verdict(check.passed),
            )
        self.console.print(table)
        self.console.print(
            "scale: standard deviation (Gaussian) or mean absolute deviation b (Laplace). A test fails when "
            "its p-value is below the per-test alpha.\n"
        )

    def _print_accountants(self, report: AccountantReport) -> None:
        if report.error is not None:
            self.console.print(f"[bold red]2. Accountants: FAIL[/bold red] {report.error}")
            return
        table = Table(
            title=(
                "2. Accountants: privacy.accounting (dp-accounting RDP, PLD) vs prv-accountant bounds "
                f"(eps_error {report.prv_eps_error:g}, delta_error delta/1000)"
            ),
            box=box.SIMPLE_HEAVY,
        )
        for column in (
            "mech.",
            "q",
            "z",
            "rounds",
            "delta",
            "RDP eps",
            "PLD eps",
            "PRV lower",
            "PRV estimate",
            "PRV upper",
            "RDP/PRV",
            "RDP >= lower",
            "PLD in bounds",
            "s",
        ):
            table.add_column(column, justify="right")
        for check in report.checks:
            s = check.setting
            ratio = None if check.rdp_epsilon is None else check.rdp_epsilon / check.prv_estimate
            table.add_row(
                s.mechanism,
                f"{s.sampling_probability:g}",
                f"{s.noise_multiplier:g}",
                str(s.rounds),
                f"{s.delta:g}",
                _float(check.rdp_epsilon),
                f"{check.pld_epsilon:.4f}",
                f"{check.prv_lower:.4f}",
                f"{check.prv_estimate:.4f}",
                f"{check.prv_upper:.4f}",
                _float(ratio, ".3f"),
                _verdict(check.rdp_ok) if check.rdp_epsilon is not None else "n/a",
                _verdict(check.pld_ok),
                f"{check.seconds:.1f}",
            )
        self.console.print(table)
        self.console.print(
            "RDP is an upper bound: it must be >= the PRV lower bound. PLD (pessimistic) must lie in "
            "[PRV lower, PRV upper + rounds x 1e-4 (its value discretisation)]. RDP n/a: RDP cannot account "
            "that event. Laplace: q = 1 only (prv-accountant has no subsampled Laplace).\n"
        )

    def _print_distributed(self, report: DistributedReport) -> None:
        ex = report.example
        self.console.print(
            f"4. Distributed DP (Skellam): epsilon {ex.epsilon:g}, delta {ex.delta:g}, {ex.rounds} rounds, "
            f"{ex.agents} agents, C {ex.clip_norm:g}, d {ex.dimension}, {ex.bits} bits -> scale "
            f"{report.scale:.6g}, per-agent mu {report.agent_mu:.6g}"
        )
        self._print_mechanisms(report.statistical, "4a. Summed Skellam shares")
        table = Table(title="4b. Skellam accounting", box=box.SIMPLE_HEAVY)
        for column in ("check", "expected", "observed", "verdict"):
            table.add_column(column)
        for check in report.analytic:
            table.add_row(check.name, check.expected, check.observed, _verdict(check.passed))
        self.console.print(table)

    def _print_audit(self, result: AuditResult) -> None:
        table = Table(
            title=(
                "3. Empirical audit of one central-DP round (q = 1): canary in vs out, Jagielski et al. 2020"
            ),
            box=box.SIMPLE_HEAVY,
            show_header=False,
        )
        table.add_column("", style="bold")
        table.add_column("", justify="right")
        rows = [
            ("noise multiplier z, clip norm C", f"{result.noise_multiplier:g}, {result.clip_norm:g}"),
            (
                "clients (honest + canary), fixed denominator m",
                f"{result.other_clients} + 1, {result.expected_clients_per_round:g}",
            ),
            ("canary delta norm (clipped to C)", f"{result.canary_norm:.1f}"),
            (
                "trials per world (threshold half / test half)",
                f"{result.trials_per_world} ({result.test_trials} test)",
            ),
            ("threshold on <released mean, u>", f"{result.threshold:.5g}"),
            (
                "false positives / false negatives (test half)",
                f"{result.false_positives} / {result.false_negatives} of {result.test_trials}",
            ),
            ("FPR, FNR", f"{result.false_positive_rate:.4f}, {result.false_negative_rate:.4f}"),
            (
                f"Clopper-Pearson upper bounds (joint {result.confidence:.0%})",
                f"{result.false_positive_rate_upper:.4f}, {result.false_negative_rate_upper:.4f}",
            ),
            ("delta", f"{result.delta:g}"),
            ("empirical epsilon lower bound", f"{result.epsilon_lower_bound:.4f}"),
            ("accounted epsilon, RDP / PLD", f"{result.epsilon_rdp:.4f} / {result.epsilon_pld:.4f}"),
            ("verdict (lower bound <= accounted PLD)", _verdict(result.passed)),
            ("seconds", f"{result.seconds:.1f}"),
        ]
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)

    def _print_distributed_table(self) -> None:
        rounds = (1, 10, 20, 100)
        reference, rows = distributed_epsilon_table(rounds=rounds)
        table = Table(
            title=(
                f"distributed Skellam, d {reference.dimension}, C {reference.clip_norm:g}, 20 agents' noise "
                f"counted, {reference.bits} bits, scale {reference.scale:.5g}, delta 1e-05: epsilon after "
                "R rounds (Skellam / Gaussian of the same variance)"
            ),
            box=box.MARKDOWN,
        )
        for column in ("mu / calibrated", "per-agent mu", "z effective", *(f"R = {r}" for r in rounds)):
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(
                f"{row['factor']:g}",
                f"{row['agent_mu']:.4g}",
                f"{row['noise_multiplier']:.3f}",
                *(f"{_short(row[f'skellam_{r}'])} / {_short(row[f'gaussian_{r}'])}" for r in rounds),
            )
        self.console.print(table)
        self.console.print(
            f"(calibrated: per-agent mu {reference.agent_mu:.6g} spends epsilon 3 in 20 rounds; "
            f"Delta_2 of one share {reference.l2_sensitivity:.6g}, replace-one sensitivity twice that)\n"
        )

    def _print_tables(self) -> None:
        started = time.perf_counter()
        cells = len(TABLE_Q) * len(TABLE_Z) * len(TABLE_ROUNDS)
        with self._progress() as progress:
            task = progress.add_task("epsilon grid", total=2 * cells)
            grids = {
                accountant: epsilon_grid(
                    sampling_probabilities=TABLE_Q,
                    noise_multipliers=TABLE_Z,
                    rounds=TABLE_ROUNDS,
                    delta=TABLE_DELTA,
                    accountant=accountant,
                    skip_above=None if accountant == "rdp" else 50.0,
                    progress=lambda: progress.advance(task),
                )
                for accountant in ("rdp", "pld")
            }
        for rounds in TABLE_ROUNDS:
            table = Table(
                title=f"epsilon at delta {TABLE_DELTA:g} after {rounds} rounds (RDP / PLD, '-' if RDP > 50)",
                box=box.MARKDOWN,
            )
            table.add_column("q \\ z", justify="right")
            for z in TABLE_Z:
                table.add_column(f"z = {z:g}", justify="right")
            for q in TABLE_Q:
                table.add_row(
                    f"{q:g}",
                    *(
                        f"{_short(grids['rdp'][(q, z, rounds)])} / {_short(grids['pld'][(q, z, rounds)])}"
                        for z in TABLE_Z
                    ),
                )
            self.console.print(table)
            self.console.print()
        levels = Table(
            title="noise multiplier z calibrated by each level (RDP, Gaussian, q = expected / eligible)",
            box=box.MARKDOWN,
        )
        levels.add_column("level (epsilon, delta)")
        for q, rounds in LEVEL_SETTINGS:
            levels.add_column(f"q = {q:g}, {rounds} rounds", justify="right")
        for level in LEVELS.values():
            levels.add_row(
                f"{level.name} ({level.epsilon:g}, {level.delta:g})",
                *(
                    format(
                        calibrate_noise_multiplier(
                            epsilon=level.epsilon,
                            delta=level.delta,
                            rounds=rounds,
                            sampling_probability=q,
                            mechanism="gaussian",
                            accountant="rdp",
                        ),
                        ".3f",
                    )
                    for q, rounds in LEVEL_SETTINGS
                ),
            )
        self.console.print(levels)
        self.console.print(f"\n(tables computed in {time.perf_counter() - started:.0f} s)\n")


def _short(value: float) -> str:
    if value != value:  # NaN: not computed (RDP epsilon above 50)
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"
