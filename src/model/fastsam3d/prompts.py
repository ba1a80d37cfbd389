"""Prompt files: every object's clicks (with the ROI each click decoded) as JSON, and replay.

Replaying the clicks in order, with the same ROIs and settings, gives the same labels and masks:
the state after a click depends only on the clicks before it (undone clicks are not stored).

Format (version 1)::

    {"format": "fastsam3d-prompts", "version": 1,
     "volume": {"shape": [..], "affine": [[..] x4], "signature": ".."},
     "model": {"name": "..", "signature": ".."},
     "settings": {...SessionSettings...},
     "objects": [{"label": 1, "committed": true, "overwrite": false,
                  "clicks": [{"point": [i, j, k], "positive": true, "roi": [x, y, z]}, ..]},
                 {"label": null, "committed": false, "clicks": [..]}]}
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import numpy as np

from .errors import InputError, SessionError
from .state import Click, SessionSettings

logger = logging.getLogger(__name__)

FORMAT = "fastsam3d-prompts"
VERSION = 1


def to_dict(session) -> dict:
    """The session's prompts as a JSON-ready dict."""
    objects = [
        {
            "label": obj.label,
            "committed": True,
            "overwrite": obj.overwrite,
            "clicks": [c.to_dict() for c in obj.clicks],
        }
        for obj in session.committed
    ]
    if session.clicks:
        clicks = [c.to_dict() for c in session.clicks]
        objects.append({"label": None, "committed": False, "clicks": clicks})
    model = session.model
    volume = session.volume
    return {
        "format": FORMAT,
        "version": VERSION,
        "volume": {
            "shape": list(volume.shape),
            "affine": np.asarray(volume.affine).tolist(),
            "signature": volume.signature,
        },
        "model": {
            "name": getattr(getattr(model, "config", None), "name", type(model).__name__),
            "signature": session._predictor.model_signature,
        },
        "settings": session.settings.to_dict(),
        "objects": objects,
    }


def dump(session, path=None) -> str:
    """JSON text of :func:`to_dict`; also written to ``path`` if given."""
    text = json.dumps(to_dict(session), indent=1)
    if path is not None:
        Path(path).write_text(text)
    return text


def load(data) -> dict:
    """A prompt document from a dict, JSON text or a path to a JSON file.

    Raises:
        InputError: it is not a fastsam3d prompt document.
    """
    if isinstance(data, dict):
        doc = data
    else:
        text = data.decode() if isinstance(data, bytes) else data
        if isinstance(text, os.PathLike) or (
            isinstance(text, str) and not text.lstrip().startswith("{")
        ):
            try:
                text = Path(text).read_text()
            except OSError as err:
                raise InputError(f"cannot read the prompt file {data}: {err}") from err
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"the prompts are not valid JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"not a {FORMAT} document: write it with Session.prompts_to_json()")
    if int(doc.get("version", 0)) > VERSION:
        raise InputError(f"prompt file version {doc['version']} is newer than this fastsam3d")
    return doc


def replay(session, data) -> None:
    """Replay a prompt document into a session that has no clicks and no commits yet.

    Raises:
        InputError: the document is malformed or was made for a volume of another shape.
        SessionError: the session already has clicks or commits.
    """
    doc = load(data)
    if session.clicks or session.committed:
        raise SessionError("from_json() needs a fresh Session (no clicks, nothing committed)")
    _check_volume(session.volume, doc.get("volume", {}))
    try:
        session.settings = SessionSettings.from_dict(doc.get("settings", {}))
        for obj in doc.get("objects", []):
            for click in obj.get("clicks", []):
                session._apply(Click.from_dict(click))
            if obj.get("committed"):
                session._commit(obj.get("overwrite"), label=obj.get("label"))
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"malformed prompt document ({err!r})") from err


def _check_volume(volume, info: dict) -> None:
    shape = tuple(info.get("shape", volume.shape))
    if shape != tuple(volume.shape):
        raise InputError(f"the prompts were made for a volume of shape {shape}, not {volume.shape}")
    if info.get("signature") not in (None, volume.signature):
        logger.warning("the prompts were made on a volume with other content: results may differ")


def _positional(args: tuple) -> tuple:
    """Sort (data, model, volume) given in any order by type."""
    from .geometry import Volume

    volume = [a for a in args if isinstance(a, Volume)]
    data = [a for a in args if isinstance(a, (str, bytes, dict, os.PathLike))]
    model = [a for a in args if not any(a is b for b in volume + data)]
    if len(volume) != 1 or len(data) != 1 or len(model) != 1:
        raise SessionError("call Session.from_json(data, model, volume) or session.from_json(data)")
    return data[0], model[0], volume[0]


class FromJson:
    """``Session.from_json``: on the class, builds a session and replays; on one, replays into it.

    ``Session.from_json(data, model, volume, device=None, **session_kwargs) -> Session``;
    ``session.from_json(data) -> session``. ``data``: JSON text, a path or a dict from
    :meth:`Session.prompts_to_json`.
    """

    def __get__(self, instance, owner):
        if instance is None:
            return functools.partial(self._build, owner)
        return functools.partial(self._into, instance)

    @staticmethod
    def _build(cls, *args, device=None, **kwargs):
        named = tuple(kwargs.pop(k) for k in ("data", "model", "volume") if k in kwargs)
        data, model, volume = _positional(args + named)
        doc = load(data)
        kwargs.setdefault("settings", SessionSettings.from_dict(doc.get("settings", {})))
        session = cls(model, volume, device, **kwargs)
        replay(session, doc)
        return session

    @staticmethod
    def _into(session, data):
        replay(session, data)
        return session
