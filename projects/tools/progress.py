"""Progress of the tools' long work: a tqdm bar on a terminal, plain timed lines in a log.

A bar rewritten with carriage returns is unreadable in a log, so elsewhere `Progress` prints
a line at the start, at most every `$CVT_PROGRESS_INTERVAL` seconds (10) and at the end:

  extract: 3/12 img (25%), 0:41 elapsed, ~2:03 left; big.png 2048x2048: stage 1 chunk 5/32
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

DEFAULT_INTERVAL = 10.0


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'


def _interval() -> float:
  try:
    return float(os.environ.get('CVT_PROGRESS_INTERVAL', DEFAULT_INTERVAL))
  except ValueError:
    return DEFAULT_INTERVAL


class Progress:
  """Counts done items of `total` (None: unknown) of `desc` ('predict'), each a `unit`.

  `enabled=False` (--no-progress) prints nothing but `write` messages; `terminal` forces
  the bar (True) or the lines (False), by default whether `stream` (stderr) is a TTY.
  """

  def __init__(self, total: int | None, desc: str, unit: str = 'img', *, enabled: bool = True,
               stream: TextIO | None = None, interval: float | None = None,
               terminal: bool | None = None):
    self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
    self.stream = stream if stream is not None else sys.stderr
    self.interval = _interval() if interval is None else interval
    if terminal is None:
      terminal = bool(getattr(self.stream, 'isatty', lambda: False)())
    self.count = 0
    self.item = ''
    self.detail = ''
    self._started = time.monotonic()
    self._last_line = -float('inf')
    self._bar = None
    if enabled and terminal:
      from tqdm import tqdm

      self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
    elif enabled:
      self._line()

  def start_item(self, item: str) -> None:
    """An item begins (its name shows beside the count); prints a line if one is due."""
    self.item, self.detail = item, ''
    self._refresh()

  def set_detail(self, detail: str) -> None:
    """Progress inside the current item, e.g. 'stage 1 chunk 5/32'."""
    self.detail = detail
    self._refresh()

  def update(self, n: int = 1) -> None:
    """`n` more items are done."""
    self.count += n
    self.item = self.detail = ''
    if self._bar is not None:
      self._bar.set_postfix_str('', refresh=False)  # the finished item's name goes
      self._bar.update(n)
    else:
      self._maybe_line()

  def write(self, message: str) -> None:
    """A message on its own line, which never breaks the bar (printed even when disabled)."""
    if self._bar is not None:
      self._bar.write(message, file=self.stream)
    else:
      print(message, file=self.stream, flush=True)

  def close(self) -> None:
    """Ends the bar, or prints the last line."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.enabled and self._last_line != float('inf'):
      self.item = self.detail = ''
      self._line()
    self._last_line = float('inf')

  def __iter__(self) -> Iterator[Any]:
    raise TypeError('use Progress.wrap(iterable)')

  def wrap(self, iterable: Iterable[Any]) -> Iterator[Any]:
    """Yields the items of `iterable`, counting each one done when the next is asked for."""
    try:
      for value in iterable:
        yield value
        self.update()
    finally:
      self.close()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _postfix(self) -> str:
    return ': '.join(part for part in (self.item, self.detail) if part)

  def _refresh(self) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(self._postfix(), refresh=True)
    else:
      self._maybe_line()

  def _maybe_line(self) -> None:
    if self.enabled and time.monotonic() - self._last_line >= self.interval:
      self._line()

  def text(self) -> str:
    """The line mode's line: count, share, elapsed, estimate left, current item."""
    elapsed = time.monotonic() - self._started
    parts = [f'{self.desc}: {self.count}']
    if self.total:
      parts[0] += f'/{self.total} {self.unit} ({100 * self.count / self.total:.0f}%)'
    else:
      parts[0] += f' {self.unit}'
    parts.append(f'{_clock(elapsed)} elapsed')
    if self.total and 0 < self.count < self.total:
      parts.append(f'~{_clock(elapsed / self.count * (self.total - self.count))} left')
    text = ', '.join(parts)
    postfix = self._postfix()
    return f'{text}; {postfix}' if postfix else text

  def _line(self) -> None:
    self._last_line = time.monotonic()
    print(self.text(), file=self.stream, flush=True)
