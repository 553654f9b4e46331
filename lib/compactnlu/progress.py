"""Progress bars for the study's long loops (training's own bar is the Trainer's, see ``trainer``).

``bar`` is tqdm with an estimate of the time left: the notebook widget in Jupyter
(``tqdm.auto``), a plain text bar on stderr under papermill (``PAPERMILL_EXECUTION``), where
a widget would not show in the executed notebook, and refreshed less often there so the
saved output stays short. ``COMPACTNLU_QUIET=1`` turns every bar off.
A bar only counts; in timed loops it advances between timed calls, never inside the timer.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm


def quiet() -> bool:
    return os.environ.get("COMPACTNLU_QUIET", "") not in ("", "0")


def papermill() -> bool:
    return bool(os.environ.get("PAPERMILL_EXECUTION"))


def bar(iterable=None, desc: str = "", total: int | None = None, leave: bool = False, **kw):
    """A tqdm bar over ``iterable`` (or a manual one, ``total`` steps, advanced by ``update``)."""
    kind = text_tqdm if papermill() else auto_tqdm
    options = dict(desc=desc, total=total, leave=leave, disable=quiet(), file=sys.stderr,
                   mininterval=5.0 if papermill() else 0.5, dynamic_ncols=True)
    return kind(iterable, **{**options, **kw})
