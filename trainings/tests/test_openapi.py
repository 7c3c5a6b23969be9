"""The OpenAPI schema says what the code does: request fields, the error shape, the task body."""

from __future__ import annotations

from dataclasses import fields

import pytest
from django.core.management import call_command

from trainings.api.serializers import TrainingConfigurationSerializer
from trainings.configuration import TrainingConfiguration
from trainings.selectors import task_payload

pytestmark = pytest.mark.django_db


@pytest.fixture
def schema(staff_client):
    response = staff_client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return response.json()


def test_the_creation_schema_has_exactly_the_configuration_fields_and_start():
    documented = set(TrainingConfigurationSerializer().fields)

    assert documented == {f.name for f in fields(TrainingConfiguration)} | {"start"}


def test_training_creation_request_documents_privacy_hyperparameters_and_start(schema):
    body = schema["paths"]["/api/v1/trainings/"]["post"]["requestBody"]["content"]["application/json"]
    reference = body["schema"]["$ref"].rsplit("/", 1)[1]
    properties = schema["components"]["schemas"][reference]["properties"]

    for name in ("hyperparameters", "privacy", "privacy_budget", "privacy_level", "start"):
        assert name in properties, name


def test_every_operation_documents_the_error_shape(schema):
    operations = [
        (path, method, operation)
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert len(operations) > 20

    for path, method, operation in operations:
        for status in ("400", "401", "403", "404", "413", "429"):
            response = operation["responses"].get(status)
            assert response, (path, method, status)
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    error = schema["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message", "details"]


def test_the_task_schema_lists_every_key_of_a_real_task(schema, make_agent, make_training):
    make_agent()
    make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2)
    task = training.rounds.get(number=1).tasks.first()
    payload = task_payload(task)
    task_schema = schema["components"]["schemas"]["Task"]
    next_task = schema["paths"]["/api/v1/agent/tasks/next"]["get"]["responses"]["200"]

    assert next_task["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Task"}
    assert set(task_schema["required"]) == set(payload) == set(task_schema["properties"])
    assert set(task_schema["properties"]["model"]["required"]) == set(payload["model"])


def test_the_schema_is_valid_openapi_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))

    assert (tmp_path / "schema.yaml").stat().st_size > 10_000
