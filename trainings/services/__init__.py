"""The coordinator's services, one module per stage of a round's life.

See DESIGN.md section 3. A round is opened (``rounds``) and its tasks issued (``tasks``); agents upload
or give their tasks back (``updates``); a settled round is aggregated into a version (``aggregation``);
asynchronous trainings hand out tasks on demand and take one server step per round (``asynchronous``);
secure-aggregation rounds run their phases between opening and aggregating (``secagg``);
``trainings`` starts and stops the whole. Every status change goes through ``trainings.state``; every
piece of Celery work is enqueued with ``transaction.on_commit`` so a worker never sees uncommitted rows;
aggregation is idempotent under retry (versions are unique per number, blobs are content-addressed, and
the round's status is re-checked under a lock before anything is written).

Callers import from ``trainings.services``: the names below are its public interface, whichever module
they live in. Modules import downwards (trainings, tasks, rounds, updates, asynchronous, aggregation);
the few calls back up the round's life (a start opens a round, a round settles asynchronously) import
lazily inside the function.
"""

from trainings.services.aggregation import (
    round_aggregate,
    round_finish,
    round_mark_aggregation_failed,
    round_updates,
)
from trainings.services.rounds import (
    rounds_check_deadlines,
    rounds_try_open_waiting,
    rounds_try_open_waiting_if_any,
)
from trainings.services.secagg import secagg_submit
from trainings.services.tasks import agent_may_download, task_next_for_agent
from trainings.services.trainings import (
    ADVISORY_LOCK_TRAINING_START,
    ASYNCHRONOUS_ALGORITHMS,
    is_asynchronous,
    training_create,
    training_create_and_start,
    training_start,
    training_stop,
)
from trainings.services.updates import (
    MAX_FAIL_REASON_CHARS,
    MAX_METRICS,
    UpdateAdmission,
    task_fail,
    update_accept_spooled,
    update_admit,
    update_max_bytes,
    update_submit,
)

__all__ = [
    "ADVISORY_LOCK_TRAINING_START",
    "ASYNCHRONOUS_ALGORITHMS",
    "MAX_FAIL_REASON_CHARS",
    "MAX_METRICS",
    "UpdateAdmission",
    "agent_may_download",
    "is_asynchronous",
    "round_aggregate",
    "round_finish",
    "round_mark_aggregation_failed",
    "round_updates",
    "rounds_check_deadlines",
    "rounds_try_open_waiting",
    "rounds_try_open_waiting_if_any",
    "secagg_submit",
    "task_fail",
    "task_next_for_agent",
    "training_create",
    "training_create_and_start",
    "training_start",
    "training_stop",
    "update_accept_spooled",
    "update_admit",
    "update_max_bytes",
    "update_submit",
]
