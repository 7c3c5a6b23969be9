"""fedagent: the Python SDK and command line of a fedsite federated-learning agent.

An agent polls a fedsite server for tasks, trains the global model on its private data and uploads the
update, as agent protocol v1 describes (``docs/agent-protocol.md``)::

    client = FederatedClient(agent_id="agent_001", server="http://localhost:8000", token="...")
    client.add_dataset("digits", x, y)
    client.run()

Invariants: this package imports numpy, httpx, tenacity, rich, the standard library and ``flcore`` only
(never Django or a server app, checked by import-linter), and never unpickles anything.
"""

from fedagent._version import __version__
from fedagent.client import FederatedClient, RunStats, TaskOutcome, enroll, task_rng
from fedagent.errors import (
    AgentApiError,
    AgentConnectionError,
    AgentError,
    AgentStopped,
    ModelIntegrityError,
    ProtocolError,
)
from fedagent.http import AgentHttpClient
from fedagent.trainer import EvalResult, FitConfig, FitResult, Trainer, ZooTrainer

__all__ = [
    "AgentApiError",
    "AgentConnectionError",
    "AgentError",
    "AgentHttpClient",
    "AgentStopped",
    "EvalResult",
    "FederatedClient",
    "FitConfig",
    "FitResult",
    "ModelIntegrityError",
    "ProtocolError",
    "RunStats",
    "TaskOutcome",
    "Trainer",
    "ZooTrainer",
    "__version__",
    "enroll",
    "task_rng",
]
