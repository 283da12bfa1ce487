"""Released CvT weights: read (.pth, .safetensors), convert to Flax, save, verify and load."""
