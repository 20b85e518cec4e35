"""The model registry: one file of equations per model."""

from __future__ import annotations

import importlib

from ..model import Model

MODEL_NAMES = ("scm", "two_layer", "anil")


def get_model(name: str) -> Model:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").MODEL


def model_file(name: str) -> str:
    """Path of the model's definition, relative to the repository root."""
    get_model(name)
    return f"derive/models/{name}.py"
