"""A tiny registry so the rest of the code never special-cases a model family.

``register_model`` registers a builder by its function name (``create_model(name, **kw)``);
the builder's return type's class is registered as a family the first time it is seen, so a
checkpoint (which records ``family`` and the config) can be rebuilt with ``build_from_config``.
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, type] = {}


def register_family(cls: type) -> type:
    """Register an ``AnomalyModel`` subclass under its ``family`` name (a class decorator)."""
    name = getattr(cls, "family", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no `family` name")
    _FAMILIES[name] = cls
    return cls


def _built_class(fn: Callable[..., nn.Module]) -> type | None:
    """The class a builder's return annotation names, or None."""
    ret = inspect.signature(fn).return_annotation
    if isinstance(ret, str):  # postponed annotations: resolve in the builder's module
        ret = fn.__globals__.get(ret)
    return ret if isinstance(ret, type) else None


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    cls = _built_class(fn)
    if cls is not None and getattr(cls, "family", ""):
        register_family(cls)
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def default_image_size(name: str) -> int:
    """The input size a model is built for when none is asked (its builder's ``image_size`` default):
    each family's accuracy/speed trade-off picks its own (see benchmarks/README.md)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    param = inspect.signature(_REGISTRY[name]).parameters.get("image_size")
    default = None if param is None else param.default
    return int(default) if isinstance(default, int) else 256


def default_schedule(name: str, n_classes: int = 1) -> tuple[int, int] | None:
    """(steps, batch size) the model's family trains with on ``n_classes`` classes when none is asked, or None
    (the training loop's own). Families whose steps are per class (``schedule_steps_per_class``) scale them."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cls = _built_class(_REGISTRY[name])
    schedule = getattr(cls, "default_schedule", None)
    if schedule is None or not getattr(cls, "schedule_steps_per_class", False):
        return schedule
    return schedule[0] * max(1, n_classes), schedule[1]


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def build_from_config(family: str, cfg_dict: dict) -> nn.Module:
    """Rebuild a model of ``family`` from its stored config (a checkpoint's ``config``)."""
    if family not in _FAMILIES:
        raise KeyError(f"unknown model family {family!r}; available: {', '.join(list_families())} "
                       "(a family added by a plugin must be imported first)")
    cls = _FAMILIES[family]
    return cls(cls.config_class.from_dict(cfg_dict))
