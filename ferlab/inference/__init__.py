"""The inference layer: loaded models and ensembles, uint8 faces -> probabilities with any test-time augmentation,
on PyTorch or ONNX Runtime. It sits under training, evaluation, explanation, recognition and serving, and imports
only the foundation (data, models, transforms, checkpoints); see docs/architecture.md."""
