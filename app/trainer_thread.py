"""The background thread that runs the trainer, and the two queues between it and the UI.

The worker only ever touches the queues: the trainer puts frozen-dataclass events on
``events``, the UI puts ``Command``s on ``commands``. The UI drains ``events`` from its own
thread with :meth:`TrainerThread.poll`, a bounded batch per ``after()`` tick, so a burst of
events cannot stall the window. No widget is touched from the worker.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app import engine_import

if TYPE_CHECKING:
    from modules.config import TrainConfig
    from modules.trainer import Command

# modules.trainer imports torch and diffusers (seconds); it is imported by the worker, never
# when the app starts.


@dataclass(frozen=True)
class WorkerFailed:
    """The worker ended without the trainer's ``Finished`` (it could not start the trainer)."""

    error: str


class TrainerThread:
    def __init__(self) -> None:
        self.events: queue.Queue[Any] = queue.Queue()
        self.commands: queue.Queue[Command] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ended = True

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the run's last event has been polled."""
        return not self._ended

    def start(self, config: TrainConfig, resume: str | None = None) -> None:
        """Run ``config`` in the worker; ``resume``: a backup folder (or ``latest``) to
        continue from."""
        if self.running:
            raise RuntimeError("a run is already going; stop it first")
        # Fresh queues: nothing from a previous run can leak into this one.
        self.events = queue.Queue()
        self.commands = queue.Queue()
        self._ended = False
        self._thread = threading.Thread(
            target=self._work,
            args=(config, self.events, self.commands, resume),
            name="trainer",
        )
        self._thread.daemon = True  # a hard kill of the app must not hang on the worker
        self._thread.start()

    def request(self, command: Command) -> None:
        if self.running:
            self.commands.put(command)

    def poll(self, max_events: int) -> list[Any]:
        """Up to ``max_events`` events, oldest first, without blocking."""
        events: list[Any] = []
        while len(events) < max_events:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            events.append(event)
            if self._is_end(event):
                self._ended = True
                break
        if not events and not self._ended and self._thread and not self._thread.is_alive():
            if not self.events.empty():
                # Its last events arrived between our get and the liveness check.
                return self.poll(max_events)
            # The worker died without a last event: report it instead of waiting forever.
            self._ended = True
            events.append(
                WorkerFailed("the trainer thread ended unexpectedly; see the terminal output")
            )
        return events

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @staticmethod
    def _is_end(event: Any) -> bool:
        if isinstance(event, WorkerFailed):
            return True
        from modules.trainer.events import Finished  # loaded by the worker before any event

        return isinstance(event, Finished)

    @staticmethod
    def _work(
        config: TrainConfig,
        events: queue.Queue[Any],
        commands: queue.Queue[Any],
        resume: str | None = None,
    ) -> None:
        try:
            engine_import.load("modules.demo.data_folder", "modules.trainer.generic_trainer")
            from modules.demo.data_folder import ensure_demo_data
            from modules.trainer import GenericTrainer
            from modules.trainer.events import StatusMessage

            # The demo presets point at demo-data/, written on first use (as the CLI does).
            for warning in ensure_demo_data(config):
                events.put(StatusMessage(warning, "warning"))
        except (ImportError, RuntimeError, OSError) as error:
            # diffusers and transformers report a failed lazy import as RuntimeError.
            events.put(WorkerFailed(f"could not start training: {error}"))
            return
        GenericTrainer(config, events, commands, resume=resume).run()
