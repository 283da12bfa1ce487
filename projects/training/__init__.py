"""The training library both projects share: `loop` (jit training, Scenic's trainer
signature), `optim`, `checkpoints`, `step_loader` and `datasets` (what their data pipelines
share), `app` (runs a project's `main`), `launch` (multi-process runs).
"""
