"""What every command-line tool of the projects shares: help, list syntax, output flags.

- `parser(prog, description)`: an `argparse.ArgumentParser` whose `--help` shows each
  option's default (`HelpFormatter`), and the exit-status epilog.
- Lists are written one way everywhere: comma-separated, no spaces
  (`--crop-size 512,1024`, `--scales 0.5,0.75,1.0`, `--stages stage1,stage3`): `sizes`,
  `floats`, `names` are the argparse types.
- `add_output_flags`: `--overwrite`, `--strict` and `--no-progress` with the same meaning in
  every tool that writes per-input outputs (see `projects.tools.output_files` for the policy).

Exit statuses (`EXIT_*`): 0 when every input was done or skipped as already done, 1 when any
failed or on an error (one `error:` line), 2 for bad arguments (argparse's own).
"""

from __future__ import annotations

import argparse

from cvt_backbone.tools import HelpFormatter

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

EXIT_EPILOG = (
    'exit status: 0 when every input was done or skipped as already done (its outputs record '
    'the same input and settings), 1 when any input failed or on an error, 2 for bad arguments.'
)


def parser(prog: str, description: str, *, epilog: str | None = EXIT_EPILOG
           ) -> argparse.ArgumentParser:
  """An ArgumentParser with the shared help formatter and the exit-status epilog."""
  return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                 formatter_class=HelpFormatter)


def _split(text: str, what: str, example: str) -> list[str]:
  parts = text.split(',')
  if not text or any(not p.strip() for p in parts):
    raise argparse.ArgumentTypeError(f'expected {what} separated by commas such as {example}, '
                                     f'got {text!r}')
  return [p.strip() for p in parts]


def sizes(text: str) -> tuple[int, int]:
  """'512' (square) or 'H,W' such as '512,1024' -> (h, w), positive integers."""
  parts = _split(text, 'H,W or one size', '512,1024')
  try:
    values = tuple(int(p) for p in parts)
  except ValueError:
    values = ()
  if len(values) not in (1, 2) or min(values) <= 0:
    raise argparse.ArgumentTypeError(
        f'expected H,W (two positive integers such as 512,1024) or one size such as 512, '
        f'got {text!r}')
  return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def floats(text: str) -> tuple[float, ...]:
  """'0.5,0.75,1.0' -> (0.5, 0.75, 1.0)."""
  parts = _split(text, 'numbers', '0.5,0.75,1.0')
  try:
    return tuple(float(p) for p in parts)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'expected numbers separated by commas such as 0.5,0.75,1.0, got {text!r}') from None


def names(text: str) -> tuple[str, ...]:
  """'stage1,stage3' -> ('stage1', 'stage3')."""
  return tuple(_split(text, 'names', 'stage1,stage3'))


def add_output_flags(parser: argparse.ArgumentParser, *, per_input: bool = True,
                     progress: bool = True) -> None:
  """`--overwrite`, and for tools of many inputs `--strict`; `--no-progress`.

  Args:
    parser: the tool's parser.
    per_input: the tool takes many inputs (predict, cvt-extract): add `--strict`.
    progress: the tool shows progress: add `--no-progress`.
  """
  parser.add_argument(
      '--overwrite', action='store_true',
      help='replace existing outputs that record another input or other settings (by default '
           'they are kept and counted as failed; outputs recording the same input and settings '
           'are skipped as already done)')
  if per_input:
    parser.add_argument(
        '--strict', action='store_true',
        help='stop at the first missing or unreadable input or output conflict (by default '
             'the other inputs are still done; the exit status is 1 either way)')
  if progress:
    parser.add_argument(
        '--no-progress', action='store_true',
        help='print no progress (a bar on a terminal, a line every 10 s in a log)')
