"""The model thread: one persistent thread owns the model, the session and every torch call.

CUDA / cuDNN state is per thread, so nothing torch-related runs anywhere else. The GUI thread only
posts small requests; this thread answers through ``emit(message)`` with the dataclasses of
:mod:`._state` (the widget turns ``emit`` into a queued Qt signal). Decode requests carry the full
prompt snapshot of an object, so when several are waiting only the newest runs. No Qt here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._engine import Engine
from ._state import (
    Committed,
    DevicesFound,
    Failure,
    MaskUpdate,
    ModelReady,
    Progress,
    Prompt,
    VolumeReady,
)

logger = logging.getLogger(__name__)

Emit = Callable[[object], None]


class Cancelled(Exception):
    """Raised inside a long task (download, encoding) when the user cancels it."""


@dataclass(frozen=True)
class _Task:
    name: str
    args: tuple = ()


@dataclass(frozen=True)
class DecodeRequest:
    """The GUI's prompts for one object; the newest request replaces waiting ones."""

    seq: int
    object_id: int
    prompts: tuple[Prompt, ...]
    sent_at: float


class ModelWorker:
    """Runs every model task, in order, on one daemon thread.

    Args:
        emit: called on the model thread with each result message; must be thread-safe.
    """

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._queue: deque[_Task | DecodeRequest] = deque()
        self._wake = threading.Condition()
        self._cancel = threading.Event()
        self._stopped = False
        self.engine = Engine(progress=self._progress, cancelled=self._cancel.is_set)
        self._thread = threading.Thread(target=self._run, name="fastsam3d-model", daemon=True)
        self._thread.start()
        self._post(_Task("find_devices"))

    # ------------------------------------------------------------ GUI-thread API

    def load_model(self, source: str, device: str, precision: str = "fp32") -> None:
        """Load weights (registry name or path) on ``device`` ("auto", "cpu", "cuda", ...)
        with the image encoder in ``precision`` ("fp32", "bf16", "int8")."""
        self._post(_Task("load_model", (source, device, precision)))

    def set_volume(self, array: Any, affine: Any, key: str, labels: Any = None) -> None:
        """Start a session on a volume (array in stored voxel order, affine voxel -> mm).

        ``labels`` (copied) holds objects committed before, so that new ids follow them.
        """
        self._post(_Task("set_volume", (array, affine, key, labels)))

    def decode(self, request: DecodeRequest) -> None:
        """Segment with these prompts; replaces a decode still waiting at the end of the queue."""
        with self._wake:
            if self._queue and isinstance(self._queue[-1], DecodeRequest):
                dropped = self._queue.pop()
                logger.debug("coalesced decode seq %d into %d", dropped.seq, request.seq)
            self._queue.append(request)
            self._wake.notify()

    def undo(self) -> None:
        self._post(_Task("undo"))

    def redo(self) -> None:
        self._post(_Task("redo"))

    def reset(self) -> None:
        self._post(_Task("reset"))

    def commit(self) -> None:
        self._post(_Task("commit"))

    def set_refine(self, enabled: bool) -> None:
        """Snap masks to image edges or not; the current object is shown again."""
        self._post(_Task("set_refine", (bool(enabled),)))

    def set_click_walker(self, mode: str) -> None:
        """When the snapping adds a plain random walker from the clicks ("ct", "on", "off")."""
        self._post(_Task("set_click_walker", (str(mode),)))

    def set_clicked_parts_only(self, enabled: bool) -> None:
        """Whether the snapping drops mask parts that hold no positive click."""
        self._post(_Task("set_clicked_parts_only", (bool(enabled),)))

    def cancel(self) -> None:
        """Cancel the running download or encoding (the next progress check raises)."""
        self._cancel.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the thread after the running task; waiting tasks are dropped."""
        with self._wake:
            self._stopped = True
            self._queue.clear()
            self._wake.notify()
        self._cancel.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def pending(self) -> int:
        """Number of tasks waiting (not counting the running one)."""
        with self._wake:
            return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------ model thread

    def _post(self, task: _Task) -> None:
        with self._wake:
            self._queue.append(task)
            self._wake.notify()

    def _next(self) -> _Task | DecodeRequest | None:
        with self._wake:
            while not self._queue and not self._stopped:
                self._wake.wait()
            if self._stopped:
                return None
            self._cancel.clear()
            return self._queue.popleft()

    def _run(self) -> None:
        while (task := self._next()) is not None:
            name = "decode" if isinstance(task, DecodeRequest) else task.name
            try:
                self._dispatch(task)
            except Exception as err:  # every error becomes a notification; the thread lives on
                self._send(_failure(name, err))
                self._resync_after_failure(task)
            finally:
                self._send(Progress(name, 0, 0, finished=True))
        self.engine.close()

    def _dispatch(self, task: _Task | DecodeRequest) -> None:
        if isinstance(task, DecodeRequest):
            self._decode(task)
            return
        handler = getattr(self, f"_do_{task.name}")
        handler(*task.args)

    def _send(self, message: object) -> None:
        try:
            self._emit(message)
        except RuntimeError:  # the receiving widget is gone: stop quietly
            logger.debug("result receiver deleted; stopping the model thread")
            with self._wake:
                self._stopped = True

    def _progress(self, task: str, done: int, total: int) -> None:
        if self._cancel.is_set():
            raise Cancelled(task)
        self._send(Progress(task, done, total))

    # ------------------------------------------------------------ tasks

    def _do_find_devices(self) -> None:
        self._send(DevicesFound(self.engine.devices()))

    def _do_load_model(self, source: str, device: str, precision: str) -> None:
        name, used, warmup_ms = self.engine.load(source, device, precision)
        self._send(ModelReady(name, used, warmup_ms, precision))

    def _do_set_volume(self, array: Any, affine: Any, key: str, labels: Any) -> None:
        self.engine.open(array, affine, labels)
        self._send(VolumeReady(key, self.engine.current_id, self.engine.volume_note()))

    def _decode(self, request: DecodeRequest) -> None:
        start = time.perf_counter()
        change = self.engine.apply_prompts(request.object_id, request.prompts)
        if change is not None:
            self._send(self._update(request.seq, request.sent_at, change, start))

    def _do_undo(self) -> None:
        self._send_resync(self.engine.undo())

    def _do_redo(self) -> None:
        self._send_resync(self.engine.redo())

    def _do_reset(self) -> None:
        self._send_resync(self.engine.reset())

    def _do_set_refine(self, enabled: bool) -> None:
        self._send_resync(self.engine.set_refine(enabled))

    def _do_set_click_walker(self, mode: str) -> None:
        self._send_resync(self.engine.set_click_walker(mode))

    def _do_set_clicked_parts_only(self, enabled: bool) -> None:
        self._send_resync(self.engine.set_clicked_parts_only(enabled))

    def _do_commit(self) -> None:
        self._send(Committed(*self.engine.commit()))

    def _send_resync(self, change) -> None:
        if change is not None:
            self._send(self._update(-1, time.perf_counter(), change, time.perf_counter(), True))

    def _update(self, seq, sent_at, change, start, resync=False) -> MaskUpdate:
        return MaskUpdate(
            seq=seq,
            object_id=change.object_id,
            box=change.box,
            mask=change.mask,
            prompts=change.prompts,
            voxels=change.voxels,
            sent_at=sent_at,
            engine_ms=(time.perf_counter() - start) * 1e3,
            resync=resync,
            cache=change.cache,
            grid_mm=change.grid_mm,
        )

    def _resync_after_failure(self, task: _Task | DecodeRequest) -> None:
        """After a failed or cancelled decode, show the prompts the engine really holds."""
        if isinstance(task, DecodeRequest) and self.engine.has_session:
            try:
                self._send_resync(self.engine.current_change())
            except Exception:  # the session itself is broken: the failure was already reported
                logger.exception("could not resync prompts")


def _failure(task: str, err: BaseException) -> Failure:
    """The notification for an exception: cancellations (also wrapped ones, e.g. a download
    aborted inside pooch), errors the user can cause, and unexpected errors with their type."""
    from fastsam3d.errors import FastSAM3DError

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, Cancelled):
            what = cause.args[0] if cause.args else task
            return Failure(task, f"{what} cancelled", cancelled=True)
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, FastSAM3DError):
        return Failure(task, str(err) or type(err).__name__, expected=True)
    logger.exception("model thread: %s failed", task, exc_info=err)
    return Failure(task, f"{type(err).__name__}: {err}")
