# fedsite: two commands do all set-up on a fresh machine.
#   make demo   a real federation end to end (embedded SQLite/eager Celery unless DATABASE_URL/REDIS_URL are set)
#   make test   the whole suite against the real Postgres and Redis on 127.0.0.1, with a real Celery worker
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET ?= digits
AGENTS ?= 10

TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/fedsite
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: demo test venv lint format bench clean serve worker beat

venv: $(STAMP)

$(STAMP): requirements/base.txt requirements/agent.txt requirements/dev.txt requirements/privacy-validation.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $(STAMP)

demo: venv
	DJANGO_DEBUG=$${DJANGO_DEBUG:-1} $(PY) manage.py demo --dataset $(DATASET) --agents $(AGENTS)

test: venv
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=test-only-secret-key \
		$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .

bench: venv
	DJANGO_DEBUG=1 $(PY) bench/fedavg_blobs.py
	DJANGO_DEBUG=1 $(PY) bench/round_overhead.py

serve: venv
	DJANGO_DEBUG=$${DJANGO_DEBUG:-1} $(PY) manage.py serve

worker: venv  # one worker with embedded beat (deadlines); in production run `beat` once and workers without -B
	$(VENV)/bin/celery -A fedsite worker -B -Q aggregation,privacy,default -l info --schedule var/celerybeat-schedule

beat: venv
	$(VENV)/bin/celery -A fedsite beat -l info --schedule var/celerybeat-schedule

clean:
	rm -rf var/demo var/test
