"""Content hash of a full KV block, chained through its parent block.

Rule: a block's hash covers (parent block's hash, the block's token ids, extra keys), so two
blocks hash equal only when their whole prefixes are equal. Extra keys (a tenant's
cache_salt, an adapter id) enter the first block and so separate whole namespaces.
Hashes are stable across processes (no Python ``hash()`` randomisation) and never 0,
because 0 marks "no hash" in the pool's arrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

NO_HASH = 0


def hash_block_tokens(parent_hash: int, tokens: Sequence[int], extra_keys: tuple = ()) -> int:
    return _hash(parent_hash, np.asarray(tokens, dtype=np.int32).tobytes(), extra_keys)


def _hash(parent_hash: int, token_bytes: bytes, extra_keys: tuple) -> int:
    """The hash of a block whose token ids, as little-endian int32, are ``token_bytes``."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(parent_hash).to_bytes(8, "little", signed=True))
    h.update(token_bytes)
    if extra_keys:
        h.update(repr(tuple(extra_keys)).encode())
    value = int.from_bytes(h.digest(), "little", signed=True) & 0x7FFF_FFFF_FFFF_FFFF
    return value or 1


def hash_full_blocks(token_ids: Sequence[int], block_size: int, extra_keys: tuple = (), start: int = 0,
                     parent_hash: int = NO_HASH) -> list[int]:
    """Hashes of full blocks ``start, start+1, ...`` of ``token_ids`` (the chain continues
    from ``parent_hash``, the hash of block ``start - 1``)."""
    hashes = []
    num_full = len(token_ids) // block_size
    if num_full <= start:
        return hashes
    # every block's bytes from one conversion (the blocks are slices of it)
    data = np.asarray(token_ids[start * block_size:num_full * block_size], dtype=np.int32).tobytes()
    width = 4 * block_size
    for b in range(start, num_full):
        keys = extra_keys if b == 0 else ()
        at = (b - start) * width
        parent_hash = _hash(parent_hash, data[at:at + width], keys)
        hashes.append(parent_hash)
    return hashes
