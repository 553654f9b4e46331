"""``--set FIELD=JSON`` command-line overrides of a profile's fields (re-exported by ``config``)."""

from __future__ import annotations

import json


class OverrideError(ValueError):
    """A ``--set FIELD=JSON`` argument that is not of that form."""


def parse_override(item: str) -> tuple[str, object]:
    """``FIELD=JSON`` from --set as (field, value); a value that is not JSON is refused, not kept as text."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise OverrideError(f"--set {item!r}: expected FIELD=JSON, e.g. --set epochs=5")
    try:
        return key.strip(), json.loads(text)
    except json.JSONDecodeError as err:
        raise OverrideError(f"--set {item!r}: the value {text!r} is not JSON ({err.msg}); "
                         f"quote strings as JSON, e.g. --set 'pooling=\"mean\"'") from None
