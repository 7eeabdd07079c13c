"""A sender's kept segments: reused once released, bounded, safe when /dev/shm is full."""

from __future__ import annotations

import errno
import gc
import os

import pytest

from corral._shm import SHM_DIR, LargeBuffers, new_pool_prefix

KIB = 1024


def names(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def reference(large: LargeBuffers, name: str, size: int) -> bytes:
    return size.to_bytes(8, "big") + name.encode()


def test_a_segment_is_reused_once_its_reader_released_it_and_never_before() -> None:
    prefix = new_pool_prefix() + "1-"
    sender = LargeBuffers(prefix, 1024, "w")
    reader = LargeBuffers(prefix, 1024, "p")
    try:
        first = sender.new_name()
        sender.write_segment(first, memoryview(b"a" * 100 * KIB))
        mapping, size = reader.map(reference(reader, first, 100 * KIB), 1 << 30)
        view = memoryview(mapping)[:size]
        second = sender.new_name()
        sender.write_segment(second, memoryview(b"b" * 100 * KIB))
        assert bytes(view[:3]) == b"aaa"  # the held segment was not written again
        assert len(sender.pool._slots) == 2
        assert reader.load(reference(reader, second, 100 * KIB), 1 << 30) == b"b" * 100 * KIB
        view.release()
        del mapping
        gc.collect()
        third = sender.new_name()
        sender.write_segment(third, memoryview(b"c" * 100 * KIB))
        assert len(sender.pool._slots) == 2  # one of the two was free again: reused
        assert reader.load(reference(reader, third, 100 * KIB), 1 << 30) == b"c" * 100 * KIB
    finally:
        sender.close()
    assert names(prefix) == []


def test_a_segment_not_yet_opened_by_its_reader_is_not_reused() -> None:
    prefix = new_pool_prefix() + "1-"
    sender = LargeBuffers(prefix, 1024, "w")
    try:
        first = sender.new_name()
        sender.write_segment(first, memoryview(b"a" * 10 * KIB))
        second = sender.new_name()
        sender.write_segment(second, memoryview(b"b" * 10 * KIB))
        with open(os.path.join(SHM_DIR, first), "rb") as segment:
            assert segment.read(10 * KIB) == b"a" * 10 * KIB
    finally:
        sender.close()
        for name in names(prefix):
            os.unlink(os.path.join(SHM_DIR, name))


def test_kept_segments_are_bounded_in_number_and_bytes() -> None:
    prefix = new_pool_prefix() + "1-"
    sender = LargeBuffers(prefix, 1024, "w")
    sender.pool.max_bytes = 1 << 20
    try:
        for _ in range(10):  # never read: every one stays lent
            sender.write_segment(sender.new_name(), memoryview(b"x" * 200 * KIB))
        assert len(sender.pool._slots) <= sender.pool.max_slots
        assert sender.pool.held <= sender.pool.max_bytes
        sender.write_segment(sender.new_name(), memoryview(b"y" * (2 << 20)))  # over the cap
        assert sender.pool.held <= sender.pool.max_bytes
    finally:
        sender.close()
        for name in names(prefix):
            os.unlink(os.path.join(SHM_DIR, name))


def test_a_full_dev_shm_means_a_one_off_segment_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    prefix = new_pool_prefix() + "1-"
    sender = LargeBuffers(prefix, 1024, "w")
    reader = LargeBuffers(prefix, 1024, "p")
    name = sender.new_name()
    sender.write_segment(name, memoryview(b"z" * 64 * KIB))
    assert sender.pool._slots == []
    assert reader.load(reference(reader, name, 64 * KIB), 1 << 30) == b"z" * 64 * KIB
    assert names(prefix) == []


def test_an_array_whose_segment_cannot_be_written_goes_in_band(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    np = pytest.importorskip("numpy")
    from corral._framing import FrameDecoder, FrameEncoder
    from corral._messages import ParentBound, Result

    prefix = new_pool_prefix() + "1-"
    sender = LargeBuffers(prefix, 1024, "w")

    def no_room(self: LargeBuffers, name: str, raw: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LargeBuffers, "write_segment", no_room)
    frame = FrameEncoder(1 << 24, sender).encode(Result(1, [np.arange(1000.0)]))
    [result] = FrameDecoder(ParentBound, 1 << 24, LargeBuffers(prefix, 1024, "p")).feed(frame)
    assert result.value[0].tolist() == list(np.arange(1000.0))  # type: ignore[union-attr]
    assert names(prefix) == []
