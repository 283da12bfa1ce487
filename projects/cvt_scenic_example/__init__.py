"""A Scenic user's project with the CvT backbone: Scenic's own trainer, models and registries."""
