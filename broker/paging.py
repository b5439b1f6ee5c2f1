"""Paging of the List* and report RPCs: opaque page tokens and the one-row look-ahead.

A token is the sort key of a page's last row as unpadded base64url text. It is opaque to callers
but neither secret nor signed: tampering with one only moves where the next page starts, and each
decoder checks the key it finds.
"""

from __future__ import annotations

import base64
from typing import TypeVar

Row = TypeVar("Row")


def encode_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    """The text in `token`; ValueError (binascii.Error, UnicodeError) when it holds none."""
    padded = token + "=" * (-len(token) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")


def rows_to_read(page_size: int) -> int | None:
    """Rows to read for a page: one more than the page, to know whether another follows; None
    (everything) for a page size of 0."""
    return page_size + 1 if page_size > 0 else None


def split_page(rows: list[Row], page_size: int) -> tuple[list[Row], Row | None]:
    """The page out of `rows_to_read(page_size)` rows, and its last row when another page
    follows (None on the last page, and for a page size of 0)."""
    if page_size <= 0 or len(rows) <= page_size:
        return rows, None
    return rows[:page_size], rows[page_size - 1]
