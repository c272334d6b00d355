"""Block hashes: the chain over whole blocks equals block-by-block hashing, from any start,
and depends on every token, the parent and the extra keys (first block only)."""

import hashlib

from tritonkv.cache.block_hash import NO_HASH, hash_block_tokens, hash_full_blocks

BS = 4
TOKENS = [7, 3, 9, 1, 4, 4, 2, 8, 6, 5, 0, 11, 12]  # 3 full blocks and one token


def reference_chain(tokens, keys=()):
    """The rule written out with hashlib: blake2b-8 of (parent int64, int32 tokens, repr(keys))."""
    out, parent = [], NO_HASH
    for b in range(len(tokens) // BS):
        h = hashlib.blake2b(digest_size=8)
        h.update(parent.to_bytes(8, "little", signed=True))
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens[b * BS:(b + 1) * BS]))
        if keys and b == 0:
            h.update(repr(tuple(keys)).encode())
        parent = (int.from_bytes(h.digest(), "little", signed=True) & 0x7FFF_FFFF_FFFF_FFFF) or 1
        out.append(parent)
    return out


def test_the_chain_is_blake2b_of_parent_tokens_and_first_block_keys():
    keys = (("cache_salt", "t1"),)
    assert hash_full_blocks(TOKENS, BS) == reference_chain(TOKENS)
    assert hash_full_blocks(TOKENS, BS, keys) == reference_chain(TOKENS, keys)
    assert hash_full_blocks(TOKENS, BS, keys) != hash_full_blocks(TOKENS, BS)
    assert [hash_block_tokens(p, TOKENS[i * BS:(i + 1) * BS]) for i, p in
            enumerate([NO_HASH] + reference_chain(TOKENS)[:2])] == reference_chain(TOKENS)


def test_a_chain_continued_from_a_later_block_equals_the_tail_of_the_whole_chain():
    whole = hash_full_blocks(TOKENS, BS)
    for start in (1, 2):
        assert hash_full_blocks(TOKENS, BS, start=start, parent_hash=whole[start - 1]) == whole[start:]
    assert hash_full_blocks(TOKENS, BS, start=3, parent_hash=whole[2]) == []
    assert hash_full_blocks(TOKENS[:3], BS) == []


def test_one_changed_token_changes_its_block_and_every_later_hash():
    changed = list(TOKENS)
    changed[5] += 1  # block 1
    a, b = hash_full_blocks(TOKENS, BS), hash_full_blocks(changed, BS)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
