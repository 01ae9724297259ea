"""Every long step shows its progress on a terminal, and nothing when piped: the
rounds, the sites done within a round, the feature pass and the backbone hand-off
(sent by the coordinator, stored by the site)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
import rich
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from rich.console import Console

from client.client_app import app as client_app
from common.backbone import BACKBONE_RECEIVED, bundle_files
from common.feature_cache import FEATURE_PASS
from common.outputs import RunOutputs
from common.reporting import RoundRecorder
from server.messaging import send_and_receive
from server.server_app import coordinate
from tests.conftest import InProcessGrid
from tests.test_federation import make_config, node_configs

#: What rich writes to move the cursor and colour text.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture()
def screen(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> io.StringIO:
    """rich's shared console, writing to a buffer that is a terminal (or, with
    ``indirect`` parameter ``False``, a pipe)."""
    out = io.StringIO()
    is_terminal = getattr(request, "param", True)
    console = Console(file=out, force_terminal=is_terminal, width=160)
    monkeypatch.setattr(rich, "_console", console)
    return out


def shown(screen: io.StringIO) -> str:
    """The text drawn, without cursor movements and colours."""
    return _CONTROL.sub("", screen.getvalue())


class ArrivingOneByOne(Grid):
    """A Flower grid whose sites reply one per pull, in order; ``lost`` sites never
    reply."""

    def __init__(self, lost: Iterable[int] = ()) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # Messages read the sender's identity from here (as in InProcessGrid).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.lost = set(lost)
        self.pull_interval = 0.0
        self.queue: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for index, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{index}"
            ids.append(f"m{index}")
            if message.metadata.dst_node_id not in self.lost:
                self.queue.append(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        if not self.queue:
            return []
        message = self.queue.pop(0)
        reply = Message(RecordDict({"done": ConfigRecord({"ok": 1})}), reply_to=message)
        return [reply]

    # The rest of Grid's interface; send_and_receive must not need it.
    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("the replies are pulled one by one, as they arrive")


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), node, "train") for node in nodes]


def test_sites_done_are_counted_one_by_one_as_their_replies_arrive(
    screen: io.StringIO,
) -> None:
    # Prepare
    grid = ArrivingOneByOne()

    # Execute
    replies = send_and_receive(
        grid, _messages([7, 8, 9]), 5.0, "round 4: sites trained"
    )

    # Assert: every count was drawn, and the replies are the three, in order
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m1", "m2"]
    text = shown(screen)
    assert "round 4: sites trained" in text
    assert all(done in text for done in ("0/3", "1/3", "2/3", "3/3"))


def test_a_site_that_never_replies_stops_the_count_at_the_timeout() -> None:
    # Prepare
    grid = ArrivingOneByOne(lost=[8])

    # Execute
    replies = send_and_receive(grid, _messages([7, 8, 9]), 0.2, "sites trained")

    # Assert: the two that replied, after waiting no longer than the timeout
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m2"]


@pytest.mark.parametrize("screen", [True, False], indirect=True)
def test_a_round_shows_sites_features_and_backbone_hand_off_on_a_terminal_only(
    screen: io.StringIO,
    tiny_backbone: Path,
    small_jsonl: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # Prepare: the sites' caches start empty, so round 1 ships the backbone
    output = tmp_path / "out"
    grid = InProcessGrid(client_app, node_configs(tmp_path))
    config = make_config(
        tiny_backbone, small_jsonl, output, **{"num-server-rounds": 1}
    )
    files = len(bundle_files(tiny_backbone))

    # Execute
    coordinate(grid, config)  # type: ignore[arg-type]

    # Assert
    text = shown(screen)
    if not request.node.callspec.params["screen"]:
        assert text == ""
        return
    assert "round 1/1" in text
    assert "round 1: sites trained" in text and "2/2" in text
    assert "backbone sent to sites" in text
    assert BACKBONE_RECEIVED in text and f"{files}/{files}" in text
    # the coordinator's evaluation rows, all of them done
    assert re.search(rf"{re.escape(FEATURE_PASS)}\D*(\d+)/\1\b", text)


def test_the_rounds_bar_uses_the_console_the_steps_draw_on(
    screen: io.StringIO, tmp_path: Path
) -> None:
    # Prepare: a step drawn while the rounds' bar is live
    from common.console import step_progress

    recorder = RoundRecorder(RunOutputs(tmp_path), 2)

    # Execute
    with step_progress("sites trained", 1) as advance:
        advance()
    recorder.record({"round": 1, "clients": 1, "sampled": 1, "seconds": 1.0})
    recorder.close()

    # Assert: both on the one console, so nested rather than fighting for the screen
    text = shown(screen)
    assert "sites trained" in text and "round 1/2" in text
