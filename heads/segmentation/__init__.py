"""The dense segmentation model (backbone + neck + decode heads) and its loss."""
