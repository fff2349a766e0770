"""Networks and their surgery, framework-free: plain torch, no Flower, nothing of the project."""

from models.registry import build_model, model_names, register_model

__all__ = ["build_model", "model_names", "register_model"]
