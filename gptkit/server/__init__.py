"""The OpenAI-compatible API server (`gptkit serve`): see app.py."""

from gptkit.server.app import create_app
from gptkit.server.config import ServedModel, ServerConfig

__all__ = ["ServedModel", "ServerConfig", "create_app"]
