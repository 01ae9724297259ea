"""A Flower ``Grid`` that hands each message straight to a ClientApp in this process.

For tests and benchmarks only: it lets the real coordinator code drive the real
ClientApp without any engine, record every message in both directions, and make chosen
nodes misbehave. Deployments and simulations use Flower's own engines.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

Tamper = Callable[[int, Message], Message | None]


class InProcessGrid:
    """Routes messages to ``client_app`` with one persistent Context per node.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    node_configs : Mapping[int, Mapping]
        Node id -> node config. A node with neither ``state-dir`` nor ``cache-dir``
        gets its own state folder in a temporary directory the grid owns, so no
        test leaves site state (its masking records) in the user's cache.
    tamper : callable, optional
        ``tamper(node_id, reply)`` returns the reply to deliver, or ``None`` to lose it
        (as a timeout would).

    Attributes
    ----------
    sent, received : list[Message]
        Every message in each direction.
    client_seconds : float
        Time spent inside the ClientApp (for benchmarks).
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Mapping[int, Mapping[str, Any]],
        tamper: Tamper | None = None,
    ) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # Messages read the sender's identity from here; a real ServerApp process
        # sets it.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.client_app = client_app
        self._state = tempfile.TemporaryDirectory(prefix="fedgraft-sites-")
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config=(
                    dict(config)
                    if "state-dir" in config or "cache-dir" in config
                    else {"state-dir": f"{self._state.name}/{node}", **config}
                ),
                state=RecordDict(),
                run_config={},
            )
            for node, config in node_configs.items()
        }
        self.tamper = tamper
        self.run = SimpleNamespace(run_id=1)
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.client_seconds = 0.0

    def get_node_ids(self) -> list[int]:
        """Every node's id."""
        return list(self.contexts)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """What Flower's legacy workflows call to build a message."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver each message and collect the replies (errors become error
        replies)."""
        del timeout
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            started = time.perf_counter()
            try:
                reply = self.client_app(message, self.contexts[node])
            except Exception as error:  # the real engines turn this into an error reply
                reply = Message(
                    Error(code=1, reason=f"{type(error).__name__}: {error}"),
                    reply_to=message,
                )
            self.client_seconds += time.perf_counter() - started
            delivered = self.tamper(node, reply) if self.tamper is not None else reply
            if delivered is not None:
                self.received.append(delivered)
                replies.append(delivered)
        return replies
