"""The FederatedClient the SDK tests drive against the fake server (short timeouts, digits split 300/rest)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedagent.client import FederatedClient
from fedagent.tests.fake_server import FakeAgentServer

Digits = tuple[np.ndarray, np.ndarray]


def make_client(server: FakeAgentServer, data: Digits, **kwargs: Any) -> FederatedClient:
    """A client of `server` holding the first 300 digits for training and the rest for evaluation."""
    options: dict[str, Any] = {
        "agent_id": "agent_001",
        "server": server.url,
        "token": "good-token",
        "poll_wait": 0,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "timeout": 5.0,
    }
    options.update(kwargs)
    client = FederatedClient(**options)
    x, y = data
    client.add_dataset("digits", x[:300], y[:300], split="train")
    client.add_dataset("digits", x[300:], y[300:], split="eval")
    return client
