"""The offload cache: entries record their sources, stale ones are dropped, `llmrun cache` shows and
clears it, and a cache that cannot be written ends in one line with nothing half-written."""

import os
import time

import pytest

from llmrun.weights import offload_cache
from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli, run_limited

# float32 weights run in bfloat16 with every layer on disk: each layer is converted into the cache.
STREAMED = ["hi", "--raw", "-t", "0", "-n", "2", "-q", "--dtype", "bfloat16", "--ctx", "64",
            "--cpu-mem", "320KB", "--gpu-mem", "0"]  # all 3 layers on disk (issue 18 keeps one more resident at 400KB)


@pytest.fixture()
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("offload") / "tiny", llama_config(), seed=3)


@pytest.fixture()
def offload_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "llmrun-home"))
    return tmp_path / "llmrun-home" / "offload"


def entries(root):
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_streamed_runs_keep_one_current_entry_and_cache_clears_it(tmp_path, checkpoint, offload_root):
    assert run_cli(["run", checkpoint, *STREAMED], tmp_path).returncode == 0
    [first] = entries(offload_root)
    assert sorted(p.name for p in (offload_root / first).iterdir()) == [
        "sources.json", "unit-0.bin", "unit-1.bin", "unit-2.bin", "unit-3.bin"]  # 3: the resident head, kept converted
    shown = run_cli(["cache"], tmp_path)
    assert f"current  {first}  {checkpoint / 'model.safetensors'}" in shown.stdout
    assert "in 1 entries under" in shown.stdout
    weights = checkpoint / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns()))  # the checkpoint changed: its entry is stale
    assert f"stale  {first}" in run_cli(["cache"], tmp_path).stdout
    assert run_cli(["run", checkpoint, *STREAMED], tmp_path).returncode == 0
    [second] = entries(offload_root)  # the stale entry was dropped, not kept beside the new one
    assert second != first
    cleared = run_cli(["cache", "--clear"], tmp_path)
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 1 entries (")
    assert entries(offload_root) == []


def test_entries_without_sources_and_dead_writers_leftovers(offload_root, tmp_path):
    source = tmp_path / "weights.safetensors"
    source.write_bytes(b"x")
    old, young = offload_root / "old-entry", offload_root / "young-entry"
    for folder in (old, young):
        folder.mkdir(parents=True)
    long_ago = time.time() - offload_cache.UNDESCRIBED_GRACE_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    folder = offload_cache.entry_folder([source], "torch.bfloat16")
    folder.mkdir()
    dead = folder / f".unit-0.bin.{2**22 + 12345}.tmp"  # above the default pid_max: no such process
    alive = folder / f".unit-1.bin.{os.getpid()}.tmp"
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")
    offload_cache.prepare_entry(folder, [source])
    assert entries(offload_root) == sorted([folder.name, "young-entry"])
    assert not dead.exists() and alive.exists()
    assert (folder / offload_cache.SOURCES_FILE).is_file()
    source.unlink()  # the checkpoint is gone: the entry can never be used again
    offload_cache.drop_stale_entries()
    assert entries(offload_root) == ["young-entry"]


def test_offload_folder_that_is_a_file(tmp_path, checkpoint):
    (tmp_path / "llmrun-home").mkdir()
    blocker = tmp_path / "llmrun-home" / "offload"
    blocker.write_text("not a folder")
    proc = run_cli(["run", checkpoint, *STREAMED], tmp_path)
    assert_one_line_error(proc, f"{blocker} is a file, not a folder; move it away or set LLMRUN_HOME")
    assert blocker.read_text() == "not a folder"


def test_disk_full_while_writing_a_unit(tmp_path, checkpoint):
    proc = run_limited(["run", checkpoint, *STREAMED], tmp_path, 30_000)  # a unit is ~72 KB
    assert_one_line_error(proc, "file too large; free some disk space, or set LLMRUN_HOME")
    [entry] = (tmp_path / "llmrun-home" / "offload").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["sources.json"]  # no unit, no temporary file


def test_resident_weights_in_another_dtype_are_kept_converted_and_read_back(tmp_path, monkeypatch):
    """A float32 checkpoint run resident in bfloat16: the first load writes the bf16 copy, the next
    reads it instead of the checkpoint (start-up), with the same tokens; a full or unwritable home
    only means converting as before."""
    import torch

    from llmrun.engine.build import EngineOptions, build_engine
    from llmrun.weights import loader
    from tests.checkpoints import llama_config, save_checkpoint
    from tests.parity import batched_and_alone

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    folder = save_checkpoint(tmp_path / "f32", llama_config(), seed=3)
    options = EngineOptions(dtype="bfloat16", gpu_mem_bytes=0)
    first = build_engine(folder, options)
    kept = list((tmp_path / "home" / "offload").rglob("unit-*.bin"))
    assert kept, "the resident layers' bf16 copy was not written"
    prompts = [list(range(3, 20))]
    expected = batched_and_alone(first, prompts, 6)[1]

    reads = []  # read, or mapped to be packed (a bf16 run on a CPU with oneDNN)
    real, mapped = loader.TensorFileReader.read_into, loader.TensorFileReader.mapped
    monkeypatch.setattr(loader.TensorFileReader, "read_into",
                        lambda self, info, dst: reads.append(info.file) or real(self, info, dst))
    monkeypatch.setattr(loader.TensorFileReader, "mapped",
                        lambda self, info: reads.append(info.file) or mapped(self, info))
    second = build_engine(folder, options)
    assert reads and all(path.suffix == ".bin" for path in reads if path.name != "model.safetensors"
                         ) and sum(path.suffix == ".bin" for path in reads) >= len(kept)
    assert batched_and_alone(second, prompts, 6)[1] == expected

    blocker = tmp_path / "blocked"
    blocker.write_text("")  # LLMRUN_HOME is a file: nothing can be written under it
    monkeypatch.setenv("LLMRUN_HOME", str(blocker))
    third = build_engine(folder, options)
    assert batched_and_alone(third, prompts, 6)[1] == expected
    assert torch.get_num_threads() >= 1
