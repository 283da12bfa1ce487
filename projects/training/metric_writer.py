"""TensorBoard event files without TensorFlow, behind clu's `MetricWriter` methods.

clu's default writer goes through TensorFlow (1.3 GB and seconds of start-up for a log
file); this one encodes the same events with TensorBoard's own protocol buffers and logs
the scalars as clu's `LoggingWriter`. clu's class is not subclassed: importing
`clu.metric_writers` imports TensorFlow. Scalars, images, texts and histograms are written;
hyperparameters, raw summaries, videos and audios only logged.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

# Event files written by this process: part of the file name, so that two writers opened
# in the same second never share a file.
_file_counter = itertools.count()

_DEFAULT_BUCKETS = 30  # TensorBoard's and clu's default histogram bucket count


def _scalar(value: Any) -> float:
  return float(np.asarray(value).reshape(()))


def _png(image: np.ndarray) -> bytes:
  from PIL import Image

  if image.dtype != np.uint8:
    # Floats are in [0, 1], as for tf.summary.image.
    image = np.round(np.clip(np.asarray(image, np.float32), 0, 1) * 255).astype(np.uint8)
  if image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


class TensorBoardWriter:
  """Writes TensorBoard event files in `logdir`; `just_logging`: logs only, no files.

  Each write is in the file once `flush` or `close` returns.
  """

  def __init__(self, logdir: str | os.PathLike, *, just_logging: bool = False):
    self._file = None
    self._records = None
    if just_logging:
      return
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    logdir = os.fspath(logdir)
    name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
            f'{os.getpid()}.{next(_file_counter)}')
    if '://' in logdir:  # gs://... as orbax writes the checkpoints there
      from etils import epath

      path = epath.Path(logdir)
      path.mkdir(parents=True, exist_ok=True)
      self._file = (path / name).open('wb')
    else:
      os.makedirs(logdir, exist_ok=True)
      # 'x': a new file, never one already written.
      self._file = open(os.path.join(logdir, name), 'xb')  # noqa: SIM115  (closed in close)
    self._records = RecordWriter(self._file)
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write_event(self, event: Any) -> None:
    self._records.write(event.SerializeToString())

  def _write_values(self, step: int, values: list[Any]) -> None:
    if self._records is None or not values:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2

    self._write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars (Python or NumPy/JAX numbers, or size-1 arrays) at `step`."""
    scalars = {key: _scalar(value) for key, value in scalars.items()}
    logging.info('[%d] %s', step,
                 ', '.join(f'{key}={value:.6g}' for key, value in sorted(scalars.items())))
    if self._records is None:
      return
    from tensorboard.compat.proto import summary_pb2

    self._write_values(step, [summary_pb2.Summary.Value(tag=key, simple_value=value)
                              for key, value in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Images `[N,] H, W, C` (C = 1, 3 or 4; uint8, or floats in [0, 1]) at `step`.

    One image is tagged with its key, several with `key/0`, `key/1`, ...
    """
    logging.info('[%d] Got images: %s.', step,
                 {key: np.shape(value) for key, value in images.items()})
    if self._records is None:
      return
    from tensorboard.compat.proto import summary_pb2

    values = []
    for key, value in images.items():
      batch = np.asarray(value)
      batch = batch[None] if batch.ndim == 3 else batch
      if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError(f'write_images: expected an image [N,] H, W, C with C = 1, 3 or 4 for '
                         f'{key!r}, found shape {np.shape(value)}')
      for i, image in enumerate(batch):
        tag = key if len(batch) == 1 else f'{key}/{i}'
        values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
            height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
            encoded_image_string=_png(image))))
    self._write_values(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Texts (Markdown, as TensorBoard's text plugin shows them) at `step`."""
    logging.info('[%d] Got texts: %s.', step, texts)
    if self._records is None:
      return
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='text'))
    self._write_values(step, [
        summary_pb2.Summary.Value(tag=key, metadata=metadata, tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            string_val=[str(text).encode()]))
        for key, text in texts.items()])

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    """Histograms of the values of each array (`num_buckets[key]`, default 30) at `step`."""
    if self._records is None:
      logging.info('[%d] Got histograms: %s.', step, sorted(arrays))
      return
    from tensorboard.compat.proto import summary_pb2

    values = []
    for key, value in arrays.items():
      array = np.asarray(value, np.float64).ravel()
      if array.size == 0:
        continue  # as clu: nothing to show
      buckets = max(2, int((num_buckets or {}).get(key) or _DEFAULT_BUCKETS))
      counts, edges = np.histogram(array, bins=buckets)
      values.append(summary_pb2.Summary.Value(tag=key, histo=summary_pb2.HistogramProto(
          min=float(array.min()), max=float(array.max()), num=float(array.size),
          sum=float(array.sum()), sum_squares=float(np.dot(array, array)),
          bucket_limit=[float(e) for e in edges[1:]], bucket=[float(c) for c in counts])))
    self._write_values(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info('[Hyperparameters] %s', hparams)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    del metadata
    logging.info('[%d] Got raw tensors: %s.', step,
                 {key: np.shape(value) for key, value in values.items()})

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    logging.info('[%d] Got videos: %s.', step,
                 {key: np.shape(value) for key, value in videos.items()})

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    del sample_rate
    logging.info('[%d] Got audios: %s.', step,
                 {key: np.shape(value) for key, value in audios.items()})

  def flush(self) -> None:
    if self._records is not None:
      self._records.flush()
    logging.flush()

  def close(self) -> None:
    """Flushes and closes the event file; later calls do nothing."""
    if self._records is not None:
      records, self._records = self._records, None
      records.close()  # flushes and closes the file
    logging.flush()


def create_default_writer(logdir: str | os.PathLike, *,
                          just_logging: bool = False) -> TensorBoardWriter:
  """clu's `create_default_writer` without TensorFlow: event files unless `just_logging`
  (every process but the first of a run)."""
  return TensorBoardWriter(logdir, just_logging=just_logging)
