"""ferlab's model zoo: the assignment reports' architectures and ferlab's own nets."""

from ferlab.models.base import FerModel
from ferlab.models.registry import count_params, create_model, get_entry, list_models, register_model

__all__ = ["FerModel", "count_params", "create_model", "get_entry", "list_models", "register_model"]
