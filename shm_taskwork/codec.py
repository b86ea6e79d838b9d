"""Payload helpers. Payloads are bytes; objects are the caller's to encode.

JSON is the default; pickle only when asked for by name, because unpickling
data read from shared memory runs whatever code the data names.
"""
from __future__ import annotations

import json
import pickle
from typing import Any


def json_dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8."""
    return json.dumps(obj, separators=(",", ":")).encode()


def json_loads(data: bytes) -> Any:
    """The object a json_dumps payload holds."""
    return json.loads(data)


def pickle_dumps_unsafe(obj: Any) -> bytes:
    """Pickle ``obj``. Only for domains whose every writer you trust."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def pickle_loads_unsafe(data: bytes) -> Any:
    """Unpickle: runs code named by the data. Only for trusted writers."""
    return pickle.loads(data)
