"""Dashboard pages beyond the live view: the training form (validated by TrainingConfiguration, errors next
to the field), start/clone, versions, alerts, health, comparison with CSV, agents; staff only; the
Chart.js assets served by the app."""

from __future__ import annotations

import csv
import io
import re

import pytest
from django.urls import reverse

from monitoring.forms import hyperparameter_field_name
from monitoring.models import Alert, Metric
from monitoring.tests.factories import make_agent, make_alert, make_training
from trainings.models import Training

pytestmark = pytest.mark.django_db

FORM_URL = "/dashboard/trainings/new/"


def _form_data(**overrides):
    data = {
        "editor": "form",
        "name": "from the form",
        "model_type": "logreg",
        "hidden_sizes": "",
        "input_dim": "4",
        "num_classes": "3",
        "evaluation_dataset": "",
        "algorithm": "fedavg",
        "max_rounds": "5",
        "local_epochs": "1",
        "learning_rate": "0.05",
        "batch_size": "16",
        "selection": "random",
        "seed": "0",
        "privacy_choice": "none",
        "privacy_mode": "central",
        "privacy_level": "medium",
        "create": "1",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def _error_next_to(content: str, field: str) -> str:
    """The error text rendered inside the field's own block (the div that holds its input)."""
    block = re.search(rf'<div class="field has-error" data-field-name="{field}">(.*?)</div>', content, re.S)
    assert block, f"no error block for {field}"
    errors = re.search(r'<ul class="field-errors"[^>]*>(.*?)</ul>', block.group(1), re.S)
    assert errors, f"no error list inside the block of {field}"
    return re.sub(r"<[^>]+>", " ", errors.group(1))


def test_the_form_creates_a_pending_training_with_the_configuration_it_shows(admin_client):
    response = admin_client.post(
        FORM_URL,
        _form_data(**{hyperparameter_field_name("fedavg", "server_learning_rate"): "0.5"}),
    )
    training = Training.objects.get(name="from the form")
    assert response.status_code == 302
    assert response["Location"] == reverse("dashboard-training", args=[training.pk])
    assert training.status == Training.Status.PENDING
    assert training.config["max_rounds"] == 5
    assert training.config["batch_size"] == 16
    assert training.config["hyperparameters"] == {"server_learning_rate": 0.5}
    assert training.config["privacy"] is None


def test_create_and_start_starts_it(admin_client):
    data = _form_data(name="started")
    data.pop("create")
    data["start"] = "1"
    admin_client.post(FORM_URL, data)
    assert Training.objects.get(name="started").status == Training.Status.RUNNING


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"max_rounds": "0"}, "max_rounds", "at least 1"),
        ({"name": ""}, "name", "1 to 200 characters"),
        ({"min_clients_per_round": "5", "max_clients_per_round": "2"}, "min_clients_per_round", "larger"),
        ({"algorithm": "krum"}, hyperparameter_field_name("krum", "num_malicious"), "is required"),
        (
            {"algorithm": "fedavgm", hyperparameter_field_name("fedavgm", "server_momentum"): "1.5"},
            hyperparameter_field_name("fedavgm", "server_momentum"),
            "must be a number in [0, 1)",
        ),
        ({"privacy_choice": "custom", "privacy_epsilon": "-1"}, "privacy_epsilon", "Found -1"),
        (
            {"rollback_enabled": "on", "rollback_performance_threshold": "7"},
            "rollback_performance_threshold",
            "relative degradation",
        ),
        ({"model_type": "mlp", "hidden_sizes": "64, x"}, "hidden_sizes", "whole numbers"),
    ],
)
def test_configuration_errors_are_shown_next_to_their_field(admin_client, overrides, field, words):
    response = admin_client.post(FORM_URL, _form_data(**overrides))
    assert response.status_code == 200  # the form again, with the error
    assert not Training.objects.exists()
    assert words in _error_next_to(response.content.decode(), field)


def test_the_json_tab_uses_the_same_validation_and_names_the_key(admin_client):
    bad = admin_client.post(
        FORM_URL, {"editor": "json", "config_json": '{"name": "j", "max_rounds": -3}', "create": "1"}
    )
    assert bad.status_code == 200
    assert "max_rounds: Must be at least 1" in _error_next_to(bad.content.decode(), "config_json")
    not_json = admin_client.post(FORM_URL, {"editor": "json", "config_json": "{nope", "create": "1"})
    assert "Not valid JSON" in _error_next_to(not_json.content.decode(), "config_json")
    good = admin_client.post(
        FORM_URL,
        {
            "editor": "json",
            "config_json": '{"name": "j", "model_type": "logreg", "input_dim": 4, "num_classes": 3}',
            "create": "1",
        },
    )
    assert good.status_code == 302
    assert Training.objects.get(name="j").config["input_dim"] == 4


def test_clone_prefills_the_form_from_a_training(admin_client):
    source = make_training(
        "source", algorithm="fedprox", hyperparameters={"proximal_mu": 0.3}, max_rounds=9, batch_size=8
    )
    content = admin_client.get(FORM_URL, {"clone": str(source.pk)}).content.decode()
    assert 'value="source (copy)"' in content
    assert re.search(r'name="max_rounds" value="9"', content)
    assert re.search(rf'name="{hyperparameter_field_name("fedprox", "proximal_mu")}" value="0.3"', content)
    assert re.search(r'<option value="fedprox" selected>', content)


def test_start_button_starts_a_pending_training_and_refuses_a_finished_one(admin_client):
    training = make_training("pending one")
    page = admin_client.get(reverse("dashboard-training", args=[training.pk])).content.decode()
    assert 'id="start-form"' in page
    admin_client.post(reverse("dashboard-training-start", args=[training.pk]))
    training.refresh_from_db()
    assert training.status == Training.Status.RUNNING
    again = admin_client.post(reverse("dashboard-training-start", args=[training.pk]), follow=True)
    assert "pending" in again.content.decode()  # the service's refusal, shown as a message
    page = admin_client.get(reverse("dashboard-training", args=[training.pk])).content.decode()
    assert 'id="start-form"' not in page


def test_writes_are_for_staff_only(client, django_user_model):
    training = make_training("guarded")
    django_user_model.objects.create_user("viewer", password="pw-for-viewer")
    client.login(username="viewer", password="pw-for-viewer")
    response = client.post(FORM_URL, _form_data(name="sneaky"))
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    client.post(reverse("dashboard-training-start", args=[training.pk]))
    assert not Training.objects.filter(name="sneaky").exists()
    training.refresh_from_db()
    assert training.status == Training.Status.PENDING
    for url in [
        FORM_URL,
        reverse("dashboard-versions", args=[training.pk]),
        reverse("dashboard-alerts"),
        reverse("dashboard-health"),
        reverse("dashboard-compare"),
        reverse("dashboard-training-rounds", args=[training.pk]),
    ]:
        assert client.get(url).status_code == 302, url


def test_every_page_renders_for_staff(admin_client):
    training = make_training("shown", start=True)
    for url in [
        FORM_URL,
        reverse("dashboard-versions", args=[training.pk]),
        reverse("dashboard-alerts"),
        reverse("dashboard-health"),
        reverse("dashboard-compare") + f"?training={training.pk}",
        reverse("dashboard-agents") + "?sort=reliability&order=desc",
    ]:
        assert admin_client.get(url).status_code == 200, url


def test_rounds_json_gives_participation_from_a_round_on(admin_client):
    training = make_training("rounds", start=True)
    url = reverse("dashboard-training-rounds", args=[training.pk])
    rounds = admin_client.get(url, {"after": "1"}).json()["rounds"]
    assert [r["round"] for r in rounds] == [1]
    assert rounds[0]["selected"] == 0 and rounds[0]["dropped"] == 0
    assert admin_client.get(url, {"after": "2"}).json()["rounds"] == []
    assert admin_client.get(url, {"after": "x"}).status_code == 400


def test_alerts_page_filters_by_state_and_severity(admin_client):
    training = make_training("alerting")
    make_alert(training, severity=Alert.Severity.CRITICAL, message="open and critical")
    make_alert(training, severity=Alert.Severity.WARNING, message="already seen", acknowledged=True)
    open_page = admin_client.get(reverse("dashboard-alerts")).content.decode()
    assert "open and critical" in open_page and "already seen" not in open_page
    acknowledged = admin_client.get(reverse("dashboard-alerts"), {"state": "acknowledged"}).content.decode()
    assert "already seen" in acknowledged and "open and critical" not in acknowledged
    warnings = admin_client.get(reverse("dashboard-alerts"), {"state": "", "severity": "warning"})
    assert "already seen" in warnings.content.decode()
    assert "open and critical" not in warnings.content.decode()
    assert warnings.context["live_trainings"] == []  # a pending training has no events to follow


def test_compare_csv_has_one_column_per_training(admin_client):
    first = make_training("=first")
    second = make_training("second")
    Metric.objects.create(training=first, round_number=1, name="accuracy", value=0.5)
    Metric.objects.create(training=first, round_number=2, name="accuracy", value=0.75)
    Metric.objects.create(training=second, round_number=2, name="accuracy", value=0.25)
    response = admin_client.get(
        reverse("dashboard-compare-csv"), {"training": [first.pk, second.pk], "metric": "accuracy"}
    )
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0] == ["round", f"'=first ({first.pk})", f"second ({second.pk})"]  # no formula injection
    assert rows[1:] == [["1", "0.5", ""], ["2", "0.75", "0.25"]]
    assert admin_client.get(reverse("dashboard-compare-csv")).status_code == 400


def test_agents_sort_on_the_server(admin_client):
    make_agent("zeta")
    make_agent("alpha")
    ascending = admin_client.get(reverse("dashboard-agents"), {"sort": "agent"}).content.decode()
    descending = admin_client.get(reverse("dashboard-agents"), {"sort": "agent", "order": "desc"})
    assert ascending.index('data-agent="alpha"') < ascending.index('data-agent="zeta"')
    content = descending.content.decode()
    assert content.index('data-agent="zeta"') < content.index('data-agent="alpha"')


@pytest.mark.parametrize(
    "path",
    [
        "/static/vendor/chart.js/chart.umd.js",
        "/static/vendor/chartjs-plugin-zoom/chartjs-plugin-zoom.min.js",
        "/static/vendor/hammerjs/hammer.min.js",
    ],
)
def test_the_chart_library_is_served_by_the_app(client, path):
    response = client.get(path)
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert len(body) > 10_000


def test_a_budget_exhausted_training_is_terminal_on_its_page(admin_client):
    training = make_training("spent", start=True)
    Training.objects.filter(pk=training.pk).update(status=Training.Status.BUDGET_EXHAUSTED)
    content = admin_client.get(reverse("dashboard-training", args=[training.pk])).content.decode()
    assert re.search(r'id="stop-form"[^>]* hidden', content)
    assert 'id="start-form"' not in content
    terminal = re.search(r'<script id="terminal-statuses" type="application/json">(.*?)</script>', content)
    assert "budget_exhausted" in terminal.group(1)  # the page stops polling on it too
    for script in ("vendor/chart.js/chart.umd.js", "vendor/chartjs-plugin-zoom/", "monitoring/chart.js"):
        assert f"/static/{script}" in content
