"""Object detection on the CvT pyramid (the FCOS/ATSS family) as a Scenic project."""
