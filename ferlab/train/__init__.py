"""Training: config, the epoch functions, callbacks, optimisers and schedules, the resumable fit loop."""
