"""The OpenAI-compatible API server (`gptkit serve`): see app.py."""

from gptkit.server.app import ServedModel, ServerConfig, create_app

__all__ = ["ServedModel", "ServerConfig", "create_app"]
