"""The training machinery the segmentation and detection projects share.

- `loop`: the jit training loop over a device mesh (Scenic's trainer signature), with the
  project's periodic `Evaluation`, progress lines and metric writer.
- `optim`: AdamW with warmup and poly or step decay, layer-wise lr decay, clipping,
  accumulation.
- `checkpoints`: orbax checkpoints, exact resume, metadata checks, restore for inference.
- `step_loader`: step-indexed, process-sliced, Grain-parallel batch loading.
- `app`: runs a project's `main(rng, config, workdir, writer)` under `scenic.app` or absl.

Each project keeps its models, data, metrics and configs.
"""
