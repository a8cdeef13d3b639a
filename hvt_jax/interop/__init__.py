"""The interop area: `.pth` files read and written without PyTorch, official checkpoints converted,
the published weights by name, export (model dir, StableHLO, SavedModel, `.pth`) and prediction."""
