"""Streamed pieces read in place on the CPU (weights/mapped.py): which pieces qualify, their views of
the file's mapping, and their pages leaving the process when released."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmrun.weights.index import build_index
from llmrun.weights.loader import pack_layout
from llmrun.weights.mapped import MappedPieces, _file_range, mappable
from llmrun.weights.pieces import make_piece


def piece_of(folder: Path, layout: dict, run_tag: str):
    return make_piece(0, pack_layout(build_index(folder), layout), run_tag)


def mapping_rss_kb(file: Path) -> int:
    """Resident kB of this process's mappings of `file` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
            inside = line.endswith(str(file))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_tensors_lying_as_staged_in_one_file_are_views_of_its_mapping(tmp_path):
    stored = {"a": torch.randn(6, 8).to(torch.bfloat16), "b": torch.randn(3, 8).to(torch.bfloat16),
              "c": torch.randint(0, 255, (5, 4), dtype=torch.uint8)}
    save_file(stored, tmp_path / "model.safetensors")
    piece = piece_of(tmp_path, {"ab": ("a", "b"), "c": ("c",)}, "BF16")
    assert mappable([piece], [0])
    mapped = MappedPieces([piece], [0])
    tensors, release = mapped.take(0)
    assert torch.equal(tensors["ab"], torch.cat([stored["a"], stored["b"]])) and torch.equal(tensors["c"], stored["c"])
    release()
    assert torch.equal(tensors["ab"][:6], stored["a"])  # after the release: read again from the file, not stale
    assert mapped.take(0)[0] is tensors  # the same views every turn (what is assembled from them is kept)
    mapped.close()


def test_pieces_that_need_converting_or_gathering_or_are_misaligned_are_copied(tmp_path, monkeypatch):
    save_file({"a": torch.randn(4, 8), "b": torch.randn(4, 8), "c": torch.randn(4, 8)}, tmp_path / "f32.safetensors")
    converted = piece_of(tmp_path, {"a": ("a",)}, "BF16")  # float32 stored, staged as bfloat16
    apart = piece_of(tmp_path, {"ac": ("a", "c")}, "F32")  # stacked from tensors with another between
    whole = piece_of(tmp_path, {"ab": ("a", "b"), "c": ("c",)}, "F32")
    assert _file_range(converted) is None and _file_range(apart) is None and _file_range(whole) is not None
    odd = tmp_path / "odd"  # written by hand: safetensors' own writer puts the widest dtypes first
    odd.mkdir()
    header = json.dumps({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [3, 19]}}).encode()
    header += b" " * (-len(header) % 8)
    (odd / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(3)
                                            + torch.randn(4).numpy().tobytes())
    misaligned = piece_of(odd, {"b": ("b",)}, "F32")  # b's bytes start 3 past a float32 boundary
    assert misaligned.tensors[0].packed.parts[0].start % 4 and _file_range(misaligned) is None
    assert not mappable([whole, misaligned], [0, 1]) and mappable([whole, misaligned], [0])
    monkeypatch.setenv("LLMRUN_NO_MAP", "1")
    assert not mappable([whole], [0])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_a_piece_s_pages_are_in_the_process_only_from_its_reading_to_its_release(tmp_path):
    """Taking a piece maps nothing in (the kernel is only asked to read the next ones ahead); reading
    it maps its pages; releasing it drops them at once, in the calling thread: at most the pieces held
    are in this process (what the plan reserves for staging), never the file."""
    mib = 1024
    stored = {f"w{i}": torch.randn(512, 2048).to(torch.bfloat16) for i in range(3)}  # 2 MiB each
    file = tmp_path / "model.safetensors"
    save_file(stored, file)
    pieces = [piece_of(tmp_path, {f"w{i}": (f"w{i}",)}, "BF16") for i in range(3)]
    mapped = MappedPieces(pieces, [0, 1, 2])
    assert mapping_rss_kb(file) < 64  # nothing mapped in before the first take
    tensors, release = mapped.take(0)
    assert mapping_rss_kb(file) < 64  # pieces 1 and 2 read ahead by the kernel, not mapped
    assert torch.equal(tensors["w0"], stored["w0"])
    assert 2 * mib - 64 <= mapping_rss_kb(file) <= 2 * mib + 64  # piece 0 read
    held, release_held = mapped.take(1)
    assert torch.equal(held["w1"], stored["w1"])
    assert 4 * mib - 64 <= mapping_rss_kb(file) <= 4 * mib + 64  # two pieces held: both
    release()
    assert 2 * mib - 64 <= mapping_rss_kb(file) <= 2 * mib + 64  # piece 0's pages gone at once
    release_held()
    assert mapping_rss_kb(file) < 64
    assert torch.equal(mapped.take(0)[0]["w0"], stored["w0"])  # dropped pages read again from the file
    tensors, release = mapped.take(2)  # piece 1 skipped (as a prefill chunk skips the head)
    assert torch.equal(tensors["w2"], stored["w2"])
    release()
    assert 2 * mib - 64 <= mapping_rss_kb(file) <= 2 * mib + 64  # piece 0 still held (never released)
    mapped.close()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_a_truncated_file_is_one_error_and_a_dropped_reader_s_mapping_goes(tmp_path):
    import gc

    from llmrun.errors import InvalidModelError

    file = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, file)
    piece = piece_of(tmp_path, {"w": ("w",)}, "F32")

    def mapped_here() -> bool:
        return any(line.endswith(str(file)) for line in Path("/proc/self/maps").read_text().splitlines())

    mapped = MappedPieces([piece], [0])
    assert mapped_here()
    del mapped  # never closed (an engine nobody closed): collecting it unmaps the file
    gc.collect()
    assert not mapped_here()
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(InvalidModelError, match="is truncated"):
        MappedPieces([piece], [0])


def test_files_that_cannot_be_mapped_are_copied_by_the_reader(tmp_path, monkeypatch):
    """A file system without mmap: the streamer falls back to the reader thread, not a traceback."""
    import mmap as mmap_module

    from llmrun.weights.streamer import LayerStreamer

    stored = torch.randn(64, 64)
    save_file({"w": stored}, tmp_path / "model.safetensors")
    piece = piece_of(tmp_path, {"w": ("w",)}, "F32")

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(mmap_module, "mmap", refuse)
    streamer = LayerStreamer([piece], [None], "cpu")
    try:
        assert streamer.mapped is None and streamer.disk is not None
        with streamer.staged(0) as tensors:
            assert torch.equal(tensors["w"], stored)
    finally:
        streamer.close()
