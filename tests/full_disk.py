"""A filesystem that fills up: the local one, until writes start failing with ENOSPC."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs


class FullDiskHandler(pafs.FileSystemHandler):
    """The local filesystem until the disk fills: after ``after_bytes`` written bytes, or from the
    first write to a path that ``fills_at`` matches. From then on every write fails with ENOSPC,
    as on a full disk; reads, renames and deletes pass through."""

    def __init__(self, after_bytes: float = float("inf"), fills_at: Callable[[str], bool] = lambda path: False):
        self.local = pafs.LocalFileSystem()
        self.left = after_bytes
        self.fills_at = fills_at

    def consume(self, n: int) -> None:
        if n > self.left:
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= n

    def open_output_stream(self, path: str, metadata: dict) -> pa.NativeFile:
        if self.fills_at(path):
            self.left = 0
        handler = self

        class Budgeted:
            def __init__(self) -> None:
                self.file = open(path, "wb")  # noqa: SIM115 - closed by PythonFile
                self.closed = False

            def write(self, data: bytes) -> int:
                handler.consume(len(data))
                return self.file.write(data)

            def flush(self) -> None:
                self.file.flush()

            def close(self) -> None:
                self.file.close()
                self.closed = True

        return pa.PythonFile(Budgeted(), mode="w")

    # --- pass-through ---
    def get_type_name(self) -> str:
        return "full-disk"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other: object) -> bool:
        return self is other

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("not in tests")

    def delete_file(self, path: str) -> None:
        self.local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.local.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.local.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.local.open_input_file(path)

    def open_append_stream(self, path: str, metadata: dict) -> pa.NativeFile:
        raise OSError("not in tests")


def full_disk(
    after_bytes: float = float("inf"), fills_at: Callable[[str], bool] = lambda path: False
) -> pafs.PyFileSystem:
    return pafs.PyFileSystem(FullDiskHandler(after_bytes, fills_at))
