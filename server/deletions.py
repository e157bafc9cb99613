"""Deletion requests (``--deletions FILE``): which device asks to be forgotten, and from which round.

The file holds one request per line, ``DEVICE_ID ROUND`` (whitespace-separated integers); blank
lines and lines starting with ``#`` are skipped. From round ROUND on the device's data is gone:
the server never selects it again (server.state.Server.apply_deletions), it is not asked for a
holdout evaluation, and the ledger records the request (``deletions`` table) with the first round
the device joined. A device's earliest request stands.
"""

from __future__ import annotations

from pathlib import Path

from settings.config import ConfigError

__all__ = ["load_deletions"]


def load_deletions(path: str | Path, num_devices: int) -> dict[int, int]:
    """device id -> the round from which its data is gone.

    Raises
    ------
    settings.config.ConfigError
        If the file cannot be read, or a line is not two integers, names a device outside
        ``0 .. num_devices - 1`` or a round < 1 (the message names the file and the line).
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--deletions {p}: cannot read it ({exc.__class__.__name__}: {exc})") from exc
    out: dict[int, int] = {}
    for no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        where = f"--deletions {p}, line {no}"
        if len(parts) != 2 or not all(x.lstrip("-").isdigit() for x in parts):
            raise ConfigError(f"{where}: expected 'DEVICE_ID ROUND' (two integers), got {text[:80]!r}")
        device, round_ = int(parts[0]), int(parts[1])
        if not 0 <= device < num_devices:
            raise ConfigError(f"{where}: device {device} is not one of the run's devices 0..{num_devices - 1}")
        if round_ < 1:
            raise ConfigError(f"{where}: round {round_} must be >= 1")
        out[device] = min(round_, out.get(device, round_))
    return out
