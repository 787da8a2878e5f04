"""Model families, registered by name (timm-style): ``create_model(name, **kw)``.

Each family is one file here (see ``base.py`` for the contract); importing this package
registers every family.
"""
from .registry import build_from_config, create_model, default_image_size, list_families, list_models, register_family, register_model  # noqa: F401
from . import crossclass, efficientad, generalad, patchcore, uniad  # noqa: F401  (registers their models)
