"""Privacy budgets and their ledger.

Invariants: a training has at most one budget; the ledger holds one row per released round (the
round's DP event, as dp-accounting's own JSON form and as the parameters we rebuild it from; a
distributed-Skellam round is rebuilt from the budget's fixed Skellam parameters); the
epsilon spent is always recomputed from the whole ledger by dp-accounting, never summed by hand; a
round whose event would take the composed epsilon past the budget is never opened.
"""

from __future__ import annotations

from django.db import models


class PrivacyBudget(models.Model):
    class Mode(models.TextChoices):
        CENTRAL = "central", "central (server clips and adds noise)"
        LOCAL = "local", "local (agents clip and add noise)"
        DISTRIBUTED = "distributed", "distributed (agents add Skellam noise, the server sees only the sum)"

    class Mechanism(models.TextChoices):
        GAUSSIAN = "gaussian", "Gaussian"
        LAPLACE = "laplace", "Laplace"
        SKELLAM = "skellam", "Skellam (distributed)"

    class Accountant(models.TextChoices):
        RDP = "rdp", "Renyi DP"
        PLD = "pld", "privacy loss distributions"

    training = models.OneToOneField("trainings.Training", on_delete=models.CASCADE, related_name="privacy")
    mode = models.CharField(max_length=11, choices=Mode.choices)
    level = models.CharField(max_length=8, blank=True, help_text="low/medium/high preset, or empty (custom).")
    mechanism = models.CharField(max_length=8, choices=Mechanism.choices, default=Mechanism.GAUSSIAN)
    accountant = models.CharField(max_length=4, choices=Accountant.choices, default=Accountant.RDP)
    epsilon = models.FloatField(help_text="Total epsilon the training may spend.")
    delta = models.FloatField(help_text="Delta at which epsilon is reported.")
    noise_multiplier = models.FloatField(help_text="Noise standard deviation / clip norm (per round).")
    clip_norm = models.FloatField(
        help_text="The L2 bound of one agent's delta (the initial one if adaptive)."
    )
    adaptive_clipping = models.BooleanField(
        default=False, help_text="Track a quantile of update norms (Andrew et al. 2021); central mode only."
    )
    target_quantile = models.FloatField(default=0.5)
    clip_learning_rate = models.FloatField(default=0.2)
    expected_clients_per_round = models.PositiveIntegerField()
    population = models.PositiveIntegerField(help_text="Eligible agents assumed when calibrating the noise.")
    planned_rounds = models.PositiveIntegerField()
    bits = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Distributed: the sum lives in Z_(2^bits)."
    )
    skellam_scale = models.FloatField(null=True, blank=True, help_text="Distributed: the scale s.")
    skellam_agent_mu = models.FloatField(
        null=True, blank=True, help_text="Distributed: each agent adds Skellam(mu) noise per coordinate."
    )
    noise_agents = models.PositiveIntegerField(
        null=True, blank=True, help_text="Distributed: agents whose noise the accounting counts (at least)."
    )
    dimension = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Distributed: the model's number of parameters."
    )
    rounding_beta = models.FloatField(
        null=True, blank=True, help_text="Distributed: conditional rounding's beta."
    )
    spent_epsilon = models.FloatField(default=0.0)
    alerted_fractions = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"({self.epsilon}, {self.delta})-DP {self.mode} budget of {self.training_id}"


class PrivacyLedgerEntry(models.Model):
    budget = models.ForeignKey(PrivacyBudget, on_delete=models.CASCADE, related_name="ledger")
    round_number = models.PositiveIntegerField()
    mechanism = models.CharField(max_length=8)
    noise_multiplier = models.FloatField()
    sampling_probability = models.FloatField()
    event = models.JSONField(help_text="The round's DP event in dp-accounting's named-tuple form.")
    epsilon_after = models.FloatField(help_text="Composed epsilon of the whole ledger up to this round.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["budget", "round_number"]
        constraints = [
            models.UniqueConstraint(fields=["budget", "round_number"], name="one_ledger_entry_per_round"),
        ]

    def __str__(self) -> str:
        return f"round {self.round_number}: eps={self.epsilon_after:.4g}"
