"""What every command-line tool shares: help with defaults, comma lists (`sizes`, `floats`,
`names`), the flags of models, inputs and outputs, failed inputs, exit statuses."""

from __future__ import annotations

import argparse
import sys

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


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text}')
  return value


def positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f'expected a positive number, got {text}')
  return value


def names(text: str) -> tuple[str, ...]:
  """'stage1,stage3' -> ('stage1', 'stage3')."""
  return tuple(_split(text, 'names', 'stage1,stage3'))


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  """`--config` and `--checkpoint` of the trained-model tools (evaluate, predict)."""
  parser.add_argument('--config', required=True, metavar='CONFIG.py[:ARG]',
                      help='the experiment config, path/to/config.py or path/to/config.py:arg')
  parser.add_argument('--checkpoint', required=True, metavar='DIR',
                      help='a training workdir, its checkpoints folder (the latest step) or one '
                           'step folder in it')


def add_inputs(parser: argparse.ArgumentParser, output: str) -> None:
  """`--output` (a folder, `output` its help) and the inputs of the tools of many inputs."""
  parser.add_argument('--output', required=True, metavar='DIR', help=output)
  parser.add_argument('inputs', nargs='+', metavar='INPUT',
                      help='image files, folders (searched recursively) or glob patterns')


def add_output_flags(parser: argparse.ArgumentParser, *, per_input: bool = True,
                     progress: bool = True) -> None:
  """`--overwrite`, `--strict` for tools of many inputs (`per_input`), `--no-progress`."""
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


class Failures(list):
  """The failed inputs of a run, each reported as `<prefix> <message>` on stderr (or by
  `write`, e.g. a progress bar's), or with `strict` raised as `error` (--strict)."""

  def __init__(self, strict: bool, error: type[Exception], prefix: str):
    super().__init__()
    self.strict, self.error, self.prefix = strict, error, prefix
    self.write = None

  def __call__(self, message: str) -> None:
    if self.strict:
      raise self.error(message)
    self.append(message)
    line = f'{self.prefix} {message}'
    if self.write is not None:
      self.write(line)
    else:
      print(line, file=sys.stderr, flush=True)
