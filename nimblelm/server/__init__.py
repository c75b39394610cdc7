"""The OpenAI-compatible HTTP server (`nimblelm serve`): FastAPI routes over one engine loop thread."""
