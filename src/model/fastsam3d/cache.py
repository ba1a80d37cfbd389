"""In-memory LRU cache of ROI embeddings, keyed by signatures.

A key holds everything that changes an embedding: the volume's content signature, the model's
signature (configuration + weights), the preprocessing (version, spacing, ROI size, clipping),
the device and the ROI origin. One cache may serve several sessions and models.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

PREPROCESSING_VERSION = 1
"""Bump when preprocessing changes so that embeddings computed before are not reused."""


@dataclass(frozen=True)
class EmbeddingKey:
    """Signature of one ROI embedding."""

    volume: str
    model: str
    preprocessing: str
    device: str
    origin: tuple[int, int, int]

    @property
    def scope(self) -> tuple[str, str, str, str]:
        """Everything but the ROI: embeddings of one volume through one model."""
        return (self.volume, self.model, self.preprocessing, self.device)


class EmbeddingCache:
    """Thread-safe LRU of embeddings bounded by total bytes.

    Args:
        max_bytes: evict least recently used entries beyond this (default 512 MiB, about 650
            FastSAM3D embeddings of 384 x 8^3 float32).
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[EmbeddingKey, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: EmbeddingKey) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def __contains__(self, key: EmbeddingKey) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: EmbeddingKey, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            if key in self._entries:
                self._bytes -= self._nbytes(self._entries.pop(key))
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._bytes -= self._nbytes(old)

    def origins(self, scope: tuple) -> list[tuple[int, int, int]]:
        """ROI origins cached for one (volume, model, preprocessing, device) scope."""
        with self._lock:
            return [k.origin for k in self._entries if k.scope == scope]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @staticmethod
    def _nbytes(value: torch.Tensor) -> int:
        return value.numel() * value.element_size()


DEFAULT_CACHE = EmbeddingCache()
"""Shared by sessions that are not given their own cache."""
