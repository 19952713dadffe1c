"""One module per provider dialect; see `base.Dialect`."""

from __future__ import annotations

from lb.upstream.dialects.base import Dialect
from lb.upstream.dialects.openai import OPENAI


def dialect_for(name: str, *, default_max_tokens: int = 4096, drop_params: bool = True) -> Dialect:
    """The dialect called `name` (one of `lb.config.DIALECTS`)."""
    if name == "openai":
        return OPENAI
    if name == "anthropic":
        from lb.upstream.dialects.anthropic import AnthropicDialect

        return AnthropicDialect(default_max_tokens=default_max_tokens, drop_params=drop_params)
    if name == "ollama":
        from lb.upstream.dialects.ollama import OllamaDialect  # loaded only when a node uses it

        return OllamaDialect(drop_params=drop_params)
    raise ValueError(f"dialect {name!r} is not available")


__all__ = ["Dialect", "dialect_for"]
