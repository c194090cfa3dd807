"""OpenAI-compatible API layer."""
