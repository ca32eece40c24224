"""OpenAI-compatible HTTP server over the serving engine: `create_app(load, model_names, engine_config)`."""
from .app import create_app

__all__ = ["create_app"]
