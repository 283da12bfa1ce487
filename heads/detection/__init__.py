"""One-stage detection on a feature pyramid: ATSS head and neck, `Detector`, assignment, losses, NMS."""
