"""Prompt-prefix blocks and the index of which node served them (the PREFIX_AWARE strategy).

`blocks` is pure: it turns a request body into a hash chain over the prompt's leading bytes.
Chat: each message in order is serialized canonically as the JSON array ``[role, text]``
(``text``: the content string, or the ``text`` of its text parts joined by ``\\n``) and cut
into blocks of `BLOCK_BYTES`; a message always starts a new block, so a conversation's next
turn repeats every block of the turn before. Completions: the prompt text (each string of a
list of prompts like a message; token arrays as their JSON), cut the same way. At most
``max_blocks`` blocks are hashed, so the cost is bounded whatever the request's size. Each
block's hash is ``blake2b(previous hash + block, 8 bytes)``: equal chains mean equal prefixes.

`PrefixIndex` is the only state: a bounded LRU of block hash -> node key.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import orjson

__all__ = ["BLOCK_BYTES", "PrefixIndex", "blocks"]

#: Bytes per block (the last block of a message may be shorter).
BLOCK_BYTES = 256
_SEED = bytes(8)


def _text_of(content: Any) -> str:
    """A message's text: the string itself, or the text parts of a list joined by newlines
    (images, audio and other parts are left out)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _pieces(body: Mapping[str, Any], kind: str, budget: int) -> Iterator[bytes]:
    """The canonical serializations that make the prefix, each cut to ``budget`` bytes at most
    (text is cut before encoding: a character is at least a byte, so nothing kept changes)."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            text = _text_of(message.get("content"))[:budget]
            yield orjson.dumps([role if isinstance(role, str) else "", text])
    elif kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            yield prompt[:budget].encode()
        elif isinstance(prompt, list) and all(isinstance(item, str) for item in prompt):
            for item in prompt:
                yield item[:budget].encode()
        elif prompt is not None:
            yield orjson.dumps(prompt)[:budget]


def blocks(
    body: Mapping[str, Any], kind: str, max_blocks: int, block_bytes: int = BLOCK_BYTES
) -> tuple[bytes, ...]:
    """The hash chain of the request's leading blocks (at most ``max_blocks``; empty when the
    request has no prompt, or its kind has none, as embeddings)."""
    chain: list[bytes] = []
    previous = _SEED
    for piece in _pieces(body, kind, block_bytes * max_blocks):
        for start in range(0, max(len(piece), 1), block_bytes):
            if len(chain) >= max_blocks:
                return tuple(chain)
            block = piece[start:start + block_bytes]
            previous = hashlib.blake2b(previous + block, digest_size=8).digest()
            chain.append(previous)
    return tuple(chain)


class PrefixIndex:
    """Block hash -> the node that last served a request with that block; the least recently
    used entries go first beyond ``size`` entries."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self._owners: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def match(self, chain: Sequence[bytes], keys: Collection[str]) -> str | None:
        """The owner of the longest prefix of ``chain`` that one of ``keys`` owns (the chain
        walked from its last block back), or None."""
        owners = self._owners
        for block in reversed(chain):
            owner = owners.get(block)
            if owner is not None and owner in keys:
                return owner
        return None

    def matched(self, chain: Sequence[bytes]) -> dict[str, int]:
        """Per node, how many leading blocks of ``chain`` it owns the longest of (the depth of
        its deepest owned block); read only, the LRU order is left alone (for explanations)."""
        depths: dict[str, int] = {}
        for depth, block in enumerate(chain, 1):
            owner = self._owners.get(block)
            if owner is not None:
                depths[owner] = depth
        return depths

    def counts(self) -> dict[str, int]:
        """Blocks each node owns (O(entries): for the stats endpoint, not the request path)."""
        owned: dict[str, int] = {}
        for owner in self._owners.values():
            owned[owner] = owned.get(owner, 0) + 1
        return owned

    def record(self, chain: Sequence[bytes], key: str) -> None:
        """Every block of ``chain`` is now owned by node ``key``."""
        owners = self._owners
        for block in chain:
            owners[block] = key
            owners.move_to_end(block)
        while len(owners) > self.size:
            owners.popitem(last=False)
