"""Progress bars for long work (sampling, training, evaluation, benchmarks): tqdm, fit for logs.

On a terminal this is plain tqdm. When the stream is not a terminal (``> log 2>&1``, CI,
``nohup``), tqdm would append a carriage-return redraw ten times a second to one ever-growing
line; here it writes a whole line at most every ``LOG_INTERVAL_S`` seconds instead, so a log
shows the count, rate and ETA and can be read with ``tail`` or ``grep``. ``quiet_library_bars``
turns off the bars transformers and huggingface_hub draw on their own in that case.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # seconds between progress lines when the stream is not a terminal


class _LineStream:
    """Wraps a text stream: each tqdm redraw (``"\\r" + status + padding``) becomes one line;
    a redraw identical to the last line (the final one, drawn again on close) is skipped."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and line != self._last:
            self._stream.write(line + "\n")
            self._last = line
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, ... of the wrapped stream
        return getattr(self._stream, name)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def quiet_library_bars() -> None:
    """When stderr is not a terminal, turn off the progress bars transformers and
    huggingface_hub draw themselves (e.g. "Loading weights"): in a log they are carriage-return
    redraws and cursor movements. On a terminal they stay."""
    if _is_terminal(sys.stderr):
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)`` writing to ``file`` (default stderr); when that is not a
    terminal, one line at most every ``LOG_INTERVAL_S`` seconds (a larger ``mininterval``
    given by the caller wins) and at the end."""
    stream = kwargs.get("file") or sys.stderr
    if not kwargs.get("disable") and not _is_terminal(stream):
        kwargs["file"] = _LineStream(stream)
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL_S)
        # check the clock on every update, so a line shows the current count (tqdm's adaptive
        # miniters would let its monitor thread redraw a stale one)
        kwargs["miniters"] = 1
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
    return tqdm(*args, **kwargs)
