"""Deploying trained models: `cvt-export` (`export.py`) of the functions in `serving.py`."""
