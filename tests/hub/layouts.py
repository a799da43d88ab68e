"""Hand-built Hugging Face cache layouts: models--org--name/{blobs,snapshots/<hash>,refs/main}."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def commit_hash(text: str) -> str:
    """A stable 40-hex commit id for a test."""
    return hashlib.sha1(text.encode()).hexdigest()


def add_cached_repo(
    cache: Path,
    repo_id: str,
    source_folder: Path,
    *,
    commit: str | None = None,
    ref_newline: bool = False,
    write_ref: bool = True,
    skip: tuple[str, ...] = (),
) -> Path:
    """Lay out `source_folder`'s files as huggingface_hub does: content in blobs/, named by relative
    symlinks in snapshots/<commit>/, and refs/main holding the commit. Returns the snapshot folder."""
    commit = commit or commit_hash(repo_id)
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(source_folder).iterdir()):
        if file.name in skip or not file.is_file():
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    if write_ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit + ("\n" if ref_newline else ""))
    return snapshot
