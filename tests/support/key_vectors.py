"""The block-key spec's test vectors (tests/vectors/block_keys.json), loaded once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"
VECTORS: dict[str, Any] = json.loads((VECTORS_DIR / "block_keys.json").read_text("utf-8"))
CASES: list[dict[str, Any]] = VECTORS["cases"]
