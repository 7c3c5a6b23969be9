"""Wake long-polling agents as soon as a task exists for them.

The channel layer carries a ``task.available`` message to the group ``agent_<uuid-hex>``. The long-poll
also re-checks the database every couple of seconds, so a lost wake-up costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger("trainings.wakeup")


def agent_group(agent_pk: Any) -> str:
    return f"agent_{str(agent_pk).replace('-', '')}"


def wake_agents(agent_pks: Iterable[Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    for pk in agent_pks:
        try:
            async_to_sync(layer.group_send)(agent_group(pk), {"type": "task.available"})
        except Exception:  # waking is best effort: the poll loop re-checks the database anyway
            logger.warning("wake_failed agent=%s", pk, exc_info=True)


async def wait_for_wakeup(agent_pk: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a wake-up for this agent. True if one arrived."""
    layer = get_channel_layer()
    if layer is None or timeout <= 0:
        await asyncio.sleep(max(timeout, 0))
        return False
    channel = await layer.new_channel()
    group = agent_group(agent_pk)
    await layer.group_add(group, channel)
    try:
        await asyncio.wait_for(layer.receive(channel), timeout=timeout)
        return True
    except TimeoutError:
        return False
    finally:
        await layer.group_discard(group, channel)
