"""A stand-in for the Hugging Face Hub: HfApi.model_info and hf_hub_download over an in-memory repo."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

from tests.hub.layouts import commit_hash


class FakeHub:
    """One repo's files; records each download in order. `fail_on` makes one file's download fail."""

    def __init__(self, repo_id: str, files: dict[str, bytes], *, fail_on: str | None = None,
                 error: BaseException | None = None):
        self.repo_id = repo_id
        self.files = files
        self.commit = commit_hash("fake " + repo_id)
        self.fail_on = fail_on
        self.error = error
        self.downloaded: list[str] = []
        self.progress_bytes = 0

    def install(self, monkeypatch) -> "FakeHub":
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", self.model_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        return self

    def model_info(self, repo_id, *, files_metadata=False, **kwargs):
        if self.error is not None and self.fail_on is None:
            raise self.error
        assert repo_id == self.repo_id
        siblings = [SimpleNamespace(rfilename=name, size=len(data)) for name, data in self.files.items()]
        return SimpleNamespace(sha=self.commit, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, *, revision=None, cache_dir=None, tqdm_class=None):
        assert revision == self.commit, "files must come from one commit"
        if filename == self.fail_on:
            raise self.error
        data = self.files[filename]
        if tqdm_class is not None:
            with tqdm_class(total=len(data), unit="B", desc=filename) as bar:
                bar.update(len(data))
                self.progress_bytes += len(data)
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = repo / "snapshots" / revision / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink(os.path.relpath(blob, target.parent), target)
        self.downloaded.append(filename)
        return str(target)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(Path(folder).iterdir()) if file.is_file()}
