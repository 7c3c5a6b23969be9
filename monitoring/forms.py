"""The dashboard's training form: the fields of a ``TrainingConfiguration``, validated by it.

The form only turns fields into the JSON the REST API takes and hands it to
``TrainingConfiguration.from_dict``, the one validation every entry point shares; each error that
validation names (``max_rounds``, ``privacy.epsilon``, ``rollback.performance_threshold``, a
hyperparameter of the chosen rule, ...) is shown next to the field that carries it. Hyperparameter
fields are generated from each rule's declared ``HYPERPARAMETERS`` (flcore), so the form offers exactly
what the rule accepts, with its defaults and range as help text. The "advanced" tab takes the JSON itself.

The agents pages' two small forms (an agent, an enrolment key) are here too; the clients services they
feed validate again and store the secrets hashed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from django import forms
from django.conf import settings

from clients.models import AGENT_ID_PATTERN
from fedsite.errors import ValidationFailed
from flcore.strategies import AggregationAlgorithm
from flcore.strategies.base import REQUIRED, Hyperparameter
from flcore.strategies.registry import STRATEGIES
from privacy.configuration import KEYS as PRIVACY_KEYS
from privacy.levels import LEVELS
from trainings.configuration import EVALUATION_DATASETS, SERVER_ALGORITHMS, TrainingConfiguration
from versioning.policy import DEFAULTS as ROLLBACK_DEFAULTS

PRIVACY_CHOICES = (("none", "none"), ("level", "a privacy level"), ("custom", "custom epsilon and delta"))
# Plain configuration keys that are form fields of the same name.
PLAIN_FIELDS = (
    "name",
    "model_type",
    "input_dim",
    "num_classes",
    "evaluation_dataset",
    "algorithm",
    "max_rounds",
    "target_accuracy",
    "min_clients_per_round",
    "max_clients_per_round",
    "local_epochs",
    "learning_rate",
    "batch_size",
    "round_timeout_seconds",
    "max_round_attempts",
    "selection",
    "seed",
)
# Where an error about a configuration key is shown when the key is not itself a field.
ERROR_FIELDS = {
    "hidden_sizes": "hidden_sizes",
    "privacy": "privacy_choice",
    "privacy_level": "privacy_level",
    "privacy_budget": "privacy_epsilon",
    "privacy.level": "privacy_level",
    "privacy.mode": "privacy_mode",
    "privacy.epsilon": "privacy_epsilon",
    "privacy.delta": "privacy_delta",
    # parse_privacy names its numeric keys without the section's prefix
    "epsilon": "privacy_epsilon",
    "delta": "privacy_delta",
    "rollback": "rollback_enabled",
}
HYPERPARAMETER_IN_MESSAGE = re.compile(r"hyperparameter '([A-Za-z0-9_]+)'")


def hyperparameter_field_name(algorithm: str, name: str) -> str:
    return f"hp_{algorithm}__{name}"


def algorithm_hyperparameters() -> dict[str, tuple[Hyperparameter, ...]]:
    """Each algorithm the server runs, with the hyperparameters its rule declares."""
    return {name: STRATEGIES[AggregationAlgorithm(name)].HYPERPARAMETERS for name in SERVER_ALGORITHMS}


def _hyperparameter_field(hyperparameter: Hyperparameter) -> forms.Field:
    required = hyperparameter.default is REQUIRED
    help_text = f"{hyperparameter.allowed()}" + ("" if required else f"; default {hyperparameter.default!r}")
    initial = None if required else hyperparameter.default
    if hyperparameter.kind == "str":
        return forms.ChoiceField(
            required=False,
            choices=[(c, c) for c in hyperparameter.choices or ()],
            initial=initial,
            help_text=help_text,
        )
    if hyperparameter.kind == "int":
        return forms.IntegerField(required=False, initial=initial, help_text=help_text)
    if hyperparameter.kind == "float":
        return forms.FloatField(required=False, initial=initial, help_text=help_text)
    return forms.CharField(
        required=False,
        initial=json.dumps(initial) if initial is not None else "",
        help_text=help_text + " (JSON)",
        widget=forms.TextInput(attrs={"spellcheck": "false"}),
    )


class TrainingForm(forms.Form):
    """A training configuration as form fields (``editor=form``) or as JSON (``editor=json``)."""

    editor = forms.ChoiceField(
        choices=(("form", "form"), ("json", "JSON")), initial="form", widget=forms.HiddenInput
    )
    name = forms.CharField(max_length=200, required=False)
    model_type = forms.ChoiceField(
        label="Model", choices=(("mlp", "mlp (multi-layer perceptron)"), ("logreg", "logreg")), initial="mlp"
    )
    hidden_sizes = forms.CharField(
        label="Hidden layer sizes",
        required=False,
        initial="64",
        help_text="Comma-separated, e.g. 200, 200 for the FedAvg paper's 2NN; empty for logreg.",
    )
    input_dim = forms.IntegerField(label="Input size", initial=64, help_text="64 for digits, 784 for MNIST.")
    num_classes = forms.IntegerField(label="Classes", initial=10)
    evaluation_dataset = forms.ChoiceField(
        label="Central evaluation",
        required=False,
        choices=[("", "none"), *[(d, d) for d in EVALUATION_DATASETS]],
        initial="digits",
        help_text="A public test split the server evaluates every version on.",
    )
    algorithm = forms.ChoiceField(choices=[(a, a) for a in SERVER_ALGORITHMS], initial="fedavg")
    max_rounds = forms.IntegerField(label="Rounds", initial=20)
    target_accuracy = forms.FloatField(
        required=False, help_text="Stop when accuracy reaches this (0 to 1); empty: run all rounds."
    )
    min_clients_per_round = forms.IntegerField(label="Min agents per round", required=False)
    max_clients_per_round = forms.IntegerField(label="Max agents per round", required=False)
    local_epochs = forms.IntegerField(initial=1)
    learning_rate = forms.FloatField(label="Learning rate", initial=0.05)
    batch_size = forms.IntegerField(initial=32)
    round_timeout_seconds = forms.FloatField(
        label="Round deadline (s)", required=False, help_text="Empty: the server's default."
    )
    max_round_attempts = forms.IntegerField(
        label="Attempts per round",
        required=False,
        help_text="How often a round that missed its minimum is re-opened; empty: the default.",
    )
    selection = forms.ChoiceField(
        choices=(("random", "random"), ("reliability", "weighted by reliability")), initial="random"
    )
    seed = forms.IntegerField(initial=0, help_text="Initial weights and agent sampling.")
    privacy_choice = forms.ChoiceField(
        label="Differential privacy", choices=PRIVACY_CHOICES, initial="none", widget=forms.RadioSelect
    )
    privacy_mode = forms.ChoiceField(
        label="Where noise is added",
        choices=(("central", "central (the server)"), ("local", "local (each agent)")),
        initial="central",
    )
    privacy_level = forms.ChoiceField(
        label="Level",
        choices=[(name, f"{name}: {level.description}") for name, level in LEVELS.items()],
        initial="medium",
    )
    privacy_epsilon = forms.FloatField(label="Epsilon", required=False)
    privacy_delta = forms.FloatField(label="Delta", required=False, initial=1e-5)
    rollback_enabled = forms.BooleanField(label="Roll back automatically", required=False)
    rollback_metric = forms.CharField(initial=ROLLBACK_DEFAULTS["metric"], required=False, label="Metric")
    rollback_performance_threshold = forms.FloatField(
        initial=ROLLBACK_DEFAULTS["performance_threshold"],
        required=False,
        label="Degradation threshold",
        help_text="Relative to the best value so far.",
    )
    rollback_consecutive_degradations = forms.IntegerField(
        initial=ROLLBACK_DEFAULTS["consecutive_degradations"],
        required=False,
        label="Degraded rounds in a row",
    )
    rollback_rollback_to_best = forms.BooleanField(
        initial=ROLLBACK_DEFAULTS["rollback_to_best"], required=False, label="To the best version"
    )
    rollback_max_rollbacks = forms.IntegerField(
        initial=ROLLBACK_DEFAULTS["max_rollbacks"], required=False, label="At most (automatic rollbacks)"
    )
    config_json = forms.CharField(
        label="Configuration (JSON)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 18, "spellcheck": "false"}),
        help_text="The body of POST /api/v1/trainings/ (docs/operations.md §2.3).",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["min_clients_per_round"].help_text = f"Empty: {settings.FEDSITE_MIN_CLIENTS_PER_ROUND}."
        self.fields["max_clients_per_round"].help_text = f"Empty: {settings.FEDSITE_MAX_CLIENTS_PER_ROUND}."
        self.hyperparameter_groups: dict[str, list[str]] = {}
        for algorithm, declared in algorithm_hyperparameters().items():
            names = []
            for hyperparameter in declared:
                field_name = hyperparameter_field_name(algorithm, hyperparameter.name)
                field = _hyperparameter_field(hyperparameter)
                field.label = hyperparameter.name
                self.fields[field_name] = field
                names.append(field_name)
            self.hyperparameter_groups[algorithm] = names
        self.configuration: TrainingConfiguration | None = None
        if self.is_bound and self.data.get("editor") == "json":
            for field in self.fields.values():  # the JSON is the whole configuration
                field.required = False

    # --- building the JSON ----------------------------------------------------------------------
    def hyperparameter_fieldsets(self) -> list[dict[str, Any]]:
        """For the template: one group of bound fields per algorithm (shown for the chosen one)."""
        return [
            {"algorithm": algorithm, "fields": [self[name] for name in names]}
            for algorithm, names in self.hyperparameter_groups.items()
        ]

    def _hyperparameters(self, algorithm: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for hyperparameter in algorithm_hyperparameters().get(algorithm, ()):
            field_name = hyperparameter_field_name(algorithm, hyperparameter.name)
            value = self.cleaned_data.get(field_name)
            if value is None or value == "":
                continue  # the rule's default (or its "is required" error)
            if hyperparameter.kind == "mapping":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    self.add_error(field_name, f"Must be a JSON object: {exc.msg}.")
                    continue
            values[hyperparameter.name] = value
        return values

    def configuration_data(self) -> dict[str, Any]:
        """The configuration JSON built from the fields (the form tab)."""
        data = self.cleaned_data
        config: dict[str, Any] = {}
        for key in PLAIN_FIELDS:
            value = data.get(key)
            if value is None or value == "":
                if key in ("name",):
                    config[key] = ""
                continue
            config[key] = value
        hidden = (data.get("hidden_sizes") or "").strip()
        if hidden:
            try:
                config["hidden_sizes"] = [int(part) for part in re.split(r"[\s,]+", hidden) if part]
            except ValueError:
                self.add_error(
                    "hidden_sizes", f"Must be whole numbers separated by commas. Found {hidden!r}."
                )
        elif data.get("model_type") == "logreg":
            config["hidden_sizes"] = []
        config["hyperparameters"] = self._hyperparameters(data.get("algorithm") or "fedavg")
        choice = data.get("privacy_choice") or "none"
        if choice == "none":
            config["privacy"] = None
        elif choice == "level":
            config["privacy"] = {"mode": data.get("privacy_mode"), "level": data.get("privacy_level")}
        else:
            privacy: dict[str, Any] = {"mode": data.get("privacy_mode")}
            for key in ("epsilon", "delta"):
                if data.get(f"privacy_{key}") is not None:
                    privacy[key] = data[f"privacy_{key}"]
            config["privacy"] = privacy
        if data.get("rollback_enabled"):
            rollback: dict[str, Any] = {"enabled": True}
            for key in ROLLBACK_DEFAULTS:
                if key == "enabled":
                    continue
                value = data.get(f"rollback_{key}")
                if value is not None and value != "":
                    rollback[key] = value
            config["rollback"] = rollback
        return config

    def _json_data(self) -> dict[str, Any] | None:
        text = self.cleaned_data.get("config_json") or ""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            self.add_error(
                "config_json", f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
            )
            return None
        if not isinstance(value, dict):
            self.add_error("config_json", "Must be a JSON object (a training configuration).")
            return None
        value.pop("start", None)
        return value

    # --- validation -----------------------------------------------------------------------------
    def _error_field(self, key: str, message: str, algorithm: str) -> str | None:
        if self.cleaned_data.get("editor") == "json":
            return "config_json"
        if key == "hyperparameters":
            found = HYPERPARAMETER_IN_MESSAGE.search(message)
            field_name = hyperparameter_field_name(algorithm, found.group(1)) if found else ""
            return field_name if field_name in self.fields else "algorithm"
        if key in PLAIN_FIELDS:
            return key
        if key in ERROR_FIELDS:
            return ERROR_FIELDS[key]
        if key.startswith("rollback."):
            field_name = "rollback_" + key.split(".", 1)[1]
            return field_name if field_name in self.fields else "rollback_enabled"
        if key.startswith("privacy.") or key in PRIVACY_KEYS:
            return "privacy_choice"
        return None

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.errors:
            return cleaned
        data = self._json_data() if cleaned.get("editor") == "json" else self.configuration_data()
        if data is None or self.errors:
            return cleaned
        algorithm = str(data.get("algorithm") or "fedavg")
        try:
            self.configuration = TrainingConfiguration.from_dict(data)
        except ValidationFailed as exc:
            for key, message in (exc.details or {"": exc.message}).items():
                field_name = self._error_field(str(key), str(message), algorithm)
                if field_name is None:
                    self.add_error(None, f"{key}: {message}")
                elif field_name == "config_json":
                    self.add_error(field_name, f"{key}: {message}")
                else:
                    self.add_error(field_name, str(message))
        return cleaned


def initial_from_configuration(config: dict[str, Any]) -> dict[str, Any]:
    """Form values that reproduce a stored configuration (to clone a training)."""
    initial: dict[str, Any] = {key: config[key] for key in PLAIN_FIELDS if config.get(key) is not None}
    initial["name"] = f"{config.get('name', 'training')} (copy)"[:200]
    initial["hidden_sizes"] = ", ".join(str(size) for size in config.get("hidden_sizes") or [])
    initial["evaluation_dataset"] = config.get("evaluation_dataset") or ""
    algorithm = config.get("algorithm", "fedavg")
    for name, value in (config.get("hyperparameters") or {}).items():
        initial[hyperparameter_field_name(algorithm, name)] = (
            json.dumps(value) if isinstance(value, dict) else value
        )
    privacy = config.get("privacy")
    if privacy:
        initial["privacy_mode"] = privacy.get("mode", "central")
        if privacy.get("level") in LEVELS:
            initial["privacy_choice"] = "level"
            initial["privacy_level"] = privacy["level"]
        else:
            initial["privacy_choice"] = "custom"
            initial["privacy_epsilon"] = privacy.get("epsilon")
            initial["privacy_delta"] = privacy.get("delta")
    else:
        initial["privacy_choice"] = "none"
    rollback = config.get("rollback")
    if rollback:
        for key, value in rollback.items():
            initial[f"rollback_{key}"] = value
    clone = {key: value for key, value in config.items() if key not in ("privacy_budget", "privacy_level")}
    clone["name"] = initial["name"]
    initial["config_json"] = json.dumps(clone, indent=2)
    return initial


# --- agents and enrolment keys (the agents pages) ------------------------------------------------------
class AgentCreateForm(forms.Form):
    """An agent registered by the operator; ``clients.services.agent_create`` validates the id again."""

    agent_id = forms.RegexField(
        regex=AGENT_ID_PATTERN,
        max_length=64,
        label="Agent id",
        help_text="1 to 64 letters, digits, '_', '.' and '-'; the agent's public, stable name.",
        error_messages={"invalid": "Use 1 to 64 letters, digits, '_', '.' and '-'."},
    )


class EnrollmentKeyForm(forms.Form):
    """A key agents use to enrol themselves (``POST /api/v1/agent/enroll``)."""

    label = forms.CharField(max_length=100, help_text="Who or what the key is for (shown in the lists).")
    max_uses = forms.IntegerField(
        required=False, min_value=1, max_value=1_000_000, help_text="Empty: any number of agents."
    )
    expires_in_days = forms.FloatField(
        required=False,
        min_value=0.01,
        max_value=3650,
        label="Expires in (days)",
        help_text="Empty: never expires (revoke it in the admin).",
    )
