"""Byte sizes: the only place that parses "6GB"/"6GiB"/"512MB" and formats byte counts."""

import re

from llmrun.errors import UsageError

_UNITS = {
    "": 1,  # zero only
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
    of 1024, as in `df -H` and `df -h`. A number needs its unit ("6" is refused, not read as 6 bytes); only zero may go without one.
    """
    match = _SIZE_RE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or (not unit and float(match.group(1)) != 0):
        raise UsageError(
            f"invalid size {text!r}: use a number with a unit, e.g. 6GB, 6GiB, 512MB or 0"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def size_option_text(num_bytes: int) -> str:
    """The shortest size a person would type (whole MB, or GB to one decimal from 10 GB) that
    parse_size reads as at least `num_bytes`: 291_600_000 -> "292MB"."""
    if num_bytes < 10 * 1000**3:
        return f"{-(-num_bytes // 1000**2)}MB"
    tenths = -(-num_bytes // (100 * 1000**2))
    while parse_size(_gigabytes(tenths)) < num_bytes:  # float rounding, never by much
        tenths += 1
    return _gigabytes(tenths)


def _gigabytes(tenths: int) -> str:
    return f"{tenths // 10}GB" if tenths % 10 == 0 else f"{tenths // 10}.{tenths % 10}GB"


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
