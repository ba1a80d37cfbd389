"""Qt adapters between the model thread and napari: the result outbox and progress bars.

The model thread never touches widgets: it calls an :class:`Outbox`, which emits a queued Qt
signal on a parentless bridge object (so a closed widget can never be emitted on), and progress
messages become ``napari.utils.progress`` bars on the GUI thread.
"""

from __future__ import annotations

import threading
from typing import Any

from qtpy.QtCore import QObject, Signal

from ._state import Progress
from ._worker import ModelWorker

TASK_TITLES = {"download": "Downloading weights", "encoding": "Encoding ROI"}


class Bridge(QObject):
    """Carries model-thread messages to the GUI thread (queued connection)."""

    message = Signal(object)


class Outbox:
    """The model thread's only way to the GUI: emits on a parentless bridge until closed.

    The bridge has no Qt parent, so it outlives the widget; :meth:`close` (GUI thread) stops all
    further emits under a lock and then schedules the bridge's deletion on the GUI thread.
    """

    def __init__(self) -> None:
        self.bridge = Bridge()
        self._lock = threading.Lock()
        self._open = True

    def __call__(self, message: object) -> None:
        with self._lock:
            if not self._open:
                raise RuntimeError("the FastSAM3D widget is closed")
            self.bridge.message.emit(message)

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
        self.bridge.deleteLater()


def closer(outbox: Outbox, worker: ModelWorker):
    """A callable that closes the outbox and stops the worker; holds no reference to the widget."""

    def close(*_args) -> None:
        outbox.close()
        worker.shutdown(timeout=0.0)

    return close


class ProgressBars:
    """napari progress bars for long model-thread tasks (GUI thread only)."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        return bool(self._bars)

    def show(self, message: Progress) -> None:
        """Open, advance or (``message.finished``) close the bars."""
        if message.finished:
            self.close()
            return
        bar = self._bars.get(message.task)
        if bar is None:
            from napari.utils import progress

            title = TASK_TITLES.get(message.task, message.task)
            bar = self._bars[message.task] = progress(total=message.total or None, desc=title)
        bar.total = message.total or None
        bar.update(message.done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
