"""Types of the optional C extension built from native/keys.c."""

from collections.abc import Sequence

Tokens = bytes | memoryview | Sequence[int]

def chain_keys(tokens: Tokens, block_size: int, seed: int) -> list[int]: ...
def chain_masks(
    blocks: dict[int, int], tokens: Tokens, block_size: int, seed: int, wanted: int | None
) -> list[int]: ...
