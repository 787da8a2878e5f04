"""Model families, registered by name (timm-style): ``create_model(name, **kw)``."""
from .registry import create_model, list_models, register_model  # noqa: F401
from . import efficientad  # noqa: F401  (registers its models)
