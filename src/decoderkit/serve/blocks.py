"""The KV block pool shared by all requests, with prefix caching.

A full block is keyed by a chained hash of the tokens up to its end (`block_hashes`: the hash of a block covers its own
tokens and its parent's hash, as vLLM keys them), so two sequences that share a prefix share the blocks holding it.
Blocks are reference-counted; a keyed block whose last holder lets go is kept, evictable, and handed out again to the
next request whose prefix matches, until the pool needs the room and evicts it, least recently used first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

_ROOT = b"decoderkit-prefix-v1"


def block_hashes(tokens: Sequence[int], block_size: int, start: int = 0,
                 parent: bytes | None = None) -> list[bytes]:
    """Keys of the full blocks start, start+1, ... of a token sequence; `parent` is the key of block start-1.

    sha256 rather than Python's hash: a prompt crafted to collide with another user's prefix could read its cache."""
    keys: list[bytes] = []
    parent = parent or _ROOT
    for b in range(start, len(tokens) // block_size):
        parent = hashlib.sha256(parent + array("q", tokens[b * block_size: (b + 1) * block_size]).tobytes()).digest()
        keys.append(parent)
    return keys


class BlockPool:
    """Fixed-size KV blocks shared by all sequences; buffer row `b * block_size + s` is slot s of block b.

    `num_free` counts the blocks a request could be given now: never used, or cached and held by nobody."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        # Block 0 is never handed out: padded key slots point at it, so it is the only block that must be zeroed
        # (0 * NaN from uninitialised memory would poison attention). The rest stays uninitialised: on CPU a page is
        # only committed once a request writes to it, so memory follows use.
        shape = (num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.keys[:, :block_size].zero_()
        self.values[:, :block_size].zero_()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks, 0, -1))
        self._refs: dict[int, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks holding a keyed prefix (held or not)."""
        return len(self._key_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"{n} KV blocks requested, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one hold on each block (and empty the list); keyed blocks stay cached, the others are freed."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                del self._refs[block]
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        blocks.clear()

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """Hold and return the cached blocks of the longest run of `keys` from the first one."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            if block in self._evictable:
                del self._evictable[block]
            self._refs[block] = self._refs.get(block, 0) + 1
            blocks.append(block)
        return blocks

    def register(self, block: int, key: bytes) -> None:
        """Record that a held block now holds the full prefix `key`; a prefix cached already keeps its block."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def clear_cache(self) -> None:
        """Forget every cached prefix; blocks nobody holds become free."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._key_of.clear()
        self._block_of.clear()

    def slot(self, block_table: Sequence[int], position: int) -> int:
        """The buffer row holding `position` of a sequence with this block table."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, block_table: Sequence[int], length: int) -> torch.Tensor:
        """Buffer rows holding positions 0..length-1 of a sequence with this block table."""
        pos = torch.arange(length)
        table = torch.tensor(block_table[: self.blocks_for(length)], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
