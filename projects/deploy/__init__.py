"""Deploying trained models: `cvt-export` (`export.py`) of the functions in `serving.py`, the
ONNX route in `onnx.py`."""
