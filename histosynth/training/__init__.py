"""Training shared by every model of the workflow; it imports only the ground modules (nets, files,
seeds, device), never a stage, so every stage can train through it.

- `loop.fit`: the step-counted loop of the generators and the learned nuclei model (EMA,
  checkpoints with bit-identical resume, several optimisers, multi-process sharding, loss CSV).
- `epochs.fit_epochs`: the epoch-counted loop with early stopping of the downstream tasks.
- `errors`, `ema`, `batches` (data order and collation), `checkpoints` (weights, optimiser and RNG
  state), `resume` (the torch-free run-config comparison and resume keys), `losslog`, `grids`.
"""
