"""Background encoding of every ROI of a volume, cancellable, with progress callbacks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class PrecomputeJob:
    """Encodes a list of ROIs into the embedding cache.

    Use :meth:`fastsam3d.Session.precompute` to make one. The job calls ``progress(done, total)``
    after each ROI (ROIs already cached count as done) and stops between ROIs once
    :meth:`cancel` is called. Clicks may run meanwhile: the model lock makes them take turns.

    Attributes:
        total: number of ROIs.
        completed: ROIs done so far.
        error: the exception that ended the job, if any.
    """

    def __init__(self, predictor, rois: list, progress: ProgressCallback | None = None) -> None:
        self._predictor, self._rois, self._progress = predictor, list(rois), progress
        self.total = len(self._rois)
        self.completed = 0
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._warn_capacity()

    def _warn_capacity(self) -> None:
        cache = self._predictor.cache
        if self.total and len(cache) and cache.nbytes / len(cache) * self.total > cache.max_bytes:
            logger.warning(
                "%d ROIs may not all fit the embedding cache (%d MiB): raise its max_bytes",
                self.total,
                cache.max_bytes // 2**20,
            )

    def start(self) -> PrecomputeJob:
        """Run in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.run, name="fastsam3d-precompute", daemon=True)
        self._thread.start()
        return self

    def run(self) -> PrecomputeJob:
        """Run here, until done or cancelled; returns self."""
        try:
            for roi in self._rois:
                if self._cancel.is_set():
                    logger.info(
                        "precompute cancelled after %d of %d ROIs", self.completed, self.total
                    )
                    break
                self._predictor.embedding(roi)
                self.completed += 1
                if self._progress is not None:
                    self._progress(self.completed, self.total)
        except BaseException as err:  # reported through .error, re-raised by wait()
            self.error = err
            logger.exception("precompute failed")
        finally:
            self._finished.set()
        return self

    def cancel(self) -> None:
        """Stop after the ROI being encoded now."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True if it did. Re-raises the job's error."""
        finished = self._finished.wait(timeout)
        if finished and self.error is not None:
            raise self.error
        return finished
