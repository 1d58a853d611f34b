"""Imports every module that registers models."""

from ferlab.models import mlp, modern, reports  # noqa: F401
