# fedsite: two commands do all set-up on a fresh machine.
#   make demo   a real federation end to end (embedded SQLite/eager Celery unless DATABASE_URL/REDIS_URL are set)
#   make test   the whole suite against the real Postgres and Redis on 127.0.0.1, with a real Celery worker,
#               then the Django-side tests again on the embedded default (SQLite, eager Celery, in-memory
#               channels), which is what `make demo` and `make serve` run
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET ?= digits
AGENTS ?= 10

TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/fedsite
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
# Each run spreads its tests over TEST_WORKERS pytest-xdist processes, each with its own test database, var
# directory and Redis database (tests/xdist_workers.py): the N-th number of TEST_REDIS_DBS, or, if that is
# empty, the one N below TEST_REDIS_URL's (15 14 13 ... for the default). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 3
TEST_REDIS_DBS ?=
XDIST := -n $(TEST_WORKERS) --dist load --maxschedchunk 1
# The apps' tests (web, API, dashboard, services): run a second time on the embedded default.
EMBEDDED_TEST_PATHS ?= fedsite trainings clients privacy versioning monitoring tests

.PHONY: demo test test-stack test-embedded chromium assets venv lint format bench clean serve worker beat

venv: $(STAMP) assets

# The dashboard's browser libraries (Chart.js and its zoom plugin), from the npm registry at the versions
# package-lock.json pins, into node_modules/ (served under /static/vendor/; never committed).
assets: node_modules/.package-lock.json

node_modules/.package-lock.json: package.json package-lock.json
	@command -v npm >/dev/null || { echo "make: installing Debian's npm for the dashboard assets"; \
		apt-get install -y -q npm || { apt-get update -q && apt-get install -y -q npm; }; }
	npm ci --no-audit --no-fund
	touch $@

$(STAMP): requirements/base.txt requirements/agent.txt requirements/dev.txt requirements/privacy-validation.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $(STAMP)

demo: venv
	$(PY) manage.py demo --dataset $(DATASET) --agents $(AGENTS)

test: test-stack test-embedded

# The browser tests drive Debian's Chromium (never a browser downloaded by Playwright).
chromium:
	@test -x /usr/bin/chromium || { echo "make: installing Debian's chromium for the browser tests"; \
		apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; }

test-stack: venv chromium
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=test-only-secret-key \
		FEDSITE_TEST_REDIS_DBS="$(TEST_REDIS_DBS)" $(VENV)/bin/pytest $(XDIST) $(PYTEST_ARGS)

# End-to-end tests (marker e2e) start their own processes and stack; they run once, in test-stack.
test-embedded: venv chromium
	env -u DATABASE_URL -u REDIS_URL -u DJANGO_SECRET_KEY FEDSITE_VAR_DIR=$(CURDIR)/var/test-embedded \
		$(VENV)/bin/pytest $(XDIST) -m "not e2e" -p no:cacheprovider $(PYTEST_ARGS) $(EMBEDDED_TEST_PATHS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .

bench: venv
	DJANGO_DEBUG=1 $(PY) bench/fedavg_blobs.py
	DJANGO_DEBUG=1 $(PY) bench/round_overhead.py

serve: venv
	$(PY) manage.py serve

worker: venv  # one worker with embedded beat (deadlines); in production run `beat` once and workers without -B
	$(VENV)/bin/celery -A fedsite worker -B -Q aggregation,privacy,default -l info --schedule var/celerybeat-schedule

beat: venv
	$(VENV)/bin/celery -A fedsite beat -l info --schedule var/celerybeat-schedule

clean:
	rm -rf var/demo var/test
