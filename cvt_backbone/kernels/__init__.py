"""The backbone's compute kernels with one implementation per backend: attention, depthwise conv."""
