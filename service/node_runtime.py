"""The DICOM node's process wiring: the Storage SCP, the trigger and the sender, each round in its own thread.

``voxeldose serve`` (with ``dicom_enabled``) and ``voxeldose dicom-node`` call :func:`start_node`: the process
that listens for DICOM also starts the jobs (:class:`service.trigger.Trigger`) and sends the results
(:class:`service.sender.Sender`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .config import Settings
from .dicom_node import DicomNode
from .sender import Sender
from .store import Store
from .trigger import Trigger

log = logging.getLogger("service.trigger")


class Automation:
    """A background thread running ``ticks`` (:meth:`Trigger.tick`, or the sender's) every
    ``trigger_interval_s`` (one per database, like the dispatcher)."""

    def __init__(
        self, settings: Settings, ticks: list[Callable[[], object]], name: str = "voxeldose-automation"
    ) -> None:
        self.settings = settings
        self.ticks = ticks
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for tick in self.ticks:
                if self._stop.is_set():
                    break
                try:
                    tick()
                    self.last_error = None
                except Exception as exc:
                    self.last_error = type(exc).__name__
                    log.exception("automation: a round failed")
            self._stop.wait(self.settings.trigger_interval_s)


@dataclass
class NodeRuntime:
    """The DICOM node with its trigger and sender, as ``voxeldose serve`` and ``voxeldose dicom-node``
    run them: the process that listens for DICOM also starts the jobs and sends the results."""

    node: DicomNode
    trigger: Trigger
    sender: Sender
    automation: Automation  # the trigger's thread
    sending: Automation  # the sender's thread (a slow PACS never holds up the trigger)

    def stop(self) -> None:
        self.node.stop()
        self.automation.stop()
        self.sending.stop()


def start_node(settings: Settings, store: Store) -> NodeRuntime:
    """Listen on ``dicom_host:dicom_port`` and start the trigger/sender thread (``OSError`` when the
    port is taken; nothing is left running then)."""
    trigger = Trigger(settings, store)
    node = DicomNode(settings, store, trigger)
    sender = Sender(settings, store)
    node.start()
    automation = Automation(settings, [trigger.tick], name="voxeldose-trigger")
    sending = Automation(settings, [sender.tick], name="voxeldose-sender")
    automation.start()
    sending.start()
    if sender.destination is None:
        log.info("no DICOM destination configured: results stay in the service (VOXELDOSE_DICOM_DESTINATION_*)")
    return NodeRuntime(node, trigger, sender, automation, sending)
