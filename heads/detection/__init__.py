"""The one-stage detector (`Detector`), its ATSS targets, boxes, losses and jit NMS."""
