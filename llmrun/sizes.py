"""Byte sizes: the only place that parses "6GB"/"6GiB"/"512MB" and formats byte counts."""

import re

from llmrun.errors import UsageError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000, "KB": 1000, "KIB": 1024,
    "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
    "G": 1000**3, "GB": 1000**3, "GIB": 1024**3,
    "T": 1000**4, "TB": 1000**4, "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse a size such as "6GB", "6GiB", "512MB", "1.5G" or "0" into bytes.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB) powers
    of 1024, as in `df -H` and `df -h`.
    """
    match = _SIZE_RE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(
            f"invalid size {text!r}: use a number with a unit, e.g. 6GB, 6GiB, 512MB or 0"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(num_bytes: int) -> str:
    """Format a byte count for people: 1536 -> "1.5 KiB", 7_640_000_000 -> "7.12 GiB"."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.2f} {unit}" if abs(value) < 10 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
