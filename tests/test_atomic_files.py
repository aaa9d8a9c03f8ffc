"""Files are written through a temporary file and a rename: a failed write leaves the old file
as it was, no temporary file behind, and an error that names the file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fed_llama.common.files import write_text_atomic


def test_a_full_disk_leaves_the_old_file_intact_and_names_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "history.json"
    write_text_atomic(path, "[1]")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd: int, mode: str) -> None:
            self.fh = real_fdopen(fd, mode)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() does: no name

    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OSError) as caught:
        write_text_atomic(path, "[1, 2]")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == "[1]"
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]
