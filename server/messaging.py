"""Sending messages to sites and collecting their replies as they arrive.

Flower's ``Grid.send_and_receive`` returns only when every reply is in (or the
timeout passes), which leaves a user watching a silent console for the whole of a
round's training. :func:`send_and_receive` does the same exchange with the grid's
public ``push_messages`` / ``pull_messages`` and counts the sites done on a live bar
(on a terminal only; piped, nothing is drawn). The replies are the same messages,
collected in the order they arrive, as Flower's own loop collects them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from flwr.app import Message
from flwr.serverapp import Grid

from common.console import step_progress

#: Seconds between pulls on a grid that does not say (Flower's HttpGrid, the grid
#: of a deployed coordinator, waits as long in its own send_and_receive).
DEFAULT_PULL_SECONDS = 3.0


def send_and_receive(
    grid: Grid,
    messages: Sequence[Message],
    timeout: float | None,
    description: str,
) -> list[Message]:
    """Push ``messages`` and pull their replies until all are in or ``timeout``
    seconds have passed, advancing a live bar named ``description`` per reply.

    Parameters
    ----------
    grid : Grid
        Flower's grid; an object with ``send_and_receive`` alone (the in-process
        grid of the tests, which answers synchronously) is driven through it.
    messages : Sequence[Message]
        One per site.
    timeout : float or None
        Seconds to wait for replies; ``None`` waits for all of them.
    description : str
        What the bar counts (``"round 2: sites trained"``).

    Returns
    -------
    list[Message]
        The replies that arrived, in arrival order; a site that did not reply in
        time has none.
    """
    with step_progress(description, len(messages)) as advance:
        if not isinstance(grid, Grid):
            replies = []
            for reply in grid.send_and_receive(messages, timeout=timeout):
                replies.append(reply)
                advance()
            return replies
        pending = set(grid.push_messages(messages))
        interval = float(getattr(grid, "pull_interval", DEFAULT_PULL_SECONDS))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while deadline is None or time.monotonic() < deadline:
            arrived = list(grid.pull_messages(pending))
            for reply in arrived:
                replies.append(reply)
                advance()
            pending.difference_update(r.metadata.reply_to_message_id for r in arrived)
            if not pending:
                break
            time.sleep(interval)
        return replies
