"""The result lake: layout, atomic part writes, and run bookkeeping.

```
<lake>/runs/run_id=<id>/spec.json      job spec, versions, hardware, configs
<lake>/runs/run_id=<id>/status.json    written when the run ends (finished / failed)
<lake>/chunks/run_id=<id>/method=<m>/part-<task>.parquet
<lake>/docs/run_id=<id>/docs.parquet
```
Parts are written under a name readers do not match (``*.parquet.tmp-*``) and renamed when
complete, so a reader never sees half a file. The lake is any pyarrow filesystem URI; plain
paths are local.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.errors import KvorchError
from workers.schema import CHUNK_SCHEMA, DOC_SCHEMA, PARTITION_COLUMNS

DEFAULT_LAKE = "./kvorch-lake"


class Lake:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, ValueError):
            self.fs, self.root = pafs.LocalFileSystem(), _absolute(uri)
        self.root = self.root.rstrip("/") or "/"

    # --- layout ---------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def run_dir(self, run_id: str) -> str:
        return self.path("runs", f"run_id={run_id}")

    def part_path(self, run_id: str, method: str, task_id: str) -> str:
        return self.path("chunks", f"run_id={run_id}", f"method={method}", f"part-{task_id}.parquet")

    def glob(self, table: str) -> str:
        """The glob DuckDB reads a table from (local lakes)."""
        folder, depth = {
            "chunks": ("chunks", "*/*/*.parquet"),
            "docs": ("docs", "*/*.parquet"),
            "scores": ("scores", "*/*.parquet"),
            "runs": ("runs", "*/spec.json"),
            "statuses": ("runs", "*/status.json"),
        }[table]
        return self.path(folder, depth)

    # --- checks ---------------------------------------------------------------------------

    def ensure_writable(self) -> None:
        """Fail before any work when the lake cannot be written; touches nothing existing."""
        probe = self.path(f".kvorch-write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as exc:
            raise KvorchError(
                f"cannot write to lake {self.uri} ({exc.strerror or exc}); pass a writable --lake"
            ) from None

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def run_exists(self, run_id: str) -> bool:
        return self.fs.get_file_info(self.run_dir(run_id)).type != pafs.FileType.NotFound

    def run_ids(self) -> list[str]:
        selector = pafs.FileSelector(self.path("runs"), allow_not_found=True)
        return sorted(
            info.base_name.split("=", 1)[1]
            for info in self.fs.get_file_info(selector)
            if info.base_name.startswith("run_id=")
        )

    # --- writes ---------------------------------------------------------------------------

    def write_json(self, path: str, payload: dict) -> None:
        self._atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def write_spec(self, run_id: str, spec: dict) -> None:
        self.write_json(self.run_dir(run_id) + "/spec.json", {**spec, "run_id": run_id, "created_at": _now()})

    def write_status(self, run_id: str, status: dict) -> None:
        self.write_json(self.run_dir(run_id) + "/status.json", {**status, "run_id": run_id, "finished_at": _now()})

    def write_docs(self, run_id: str, docs: pa.Table) -> None:
        self._atomic_parquet(self.path("docs", f"run_id={run_id}", "docs.parquet"), docs.cast(DOC_SCHEMA))

    def write_rows(self, run_id: str, task_id: str, rows: pa.Table) -> int:
        """Write a task's rows as one part per method; returns the number of rows written."""
        for method in sorted(set(rows.column("method").to_pylist())):
            part = rows.filter(pc.equal(rows.column("method"), method))
            part = part.drop_columns([c for c in PARTITION_COLUMNS if c in part.column_names])
            self._atomic_parquet(self.part_path(run_id, method, task_id), part.cast(CHUNK_SCHEMA))
        return rows.num_rows

    def write_table(self, path: str, table: pa.Table) -> None:
        """Any Parquet table of the lake, atomically (tmp name, then rename)."""
        self._atomic_parquet(path, table)

    def _atomic_parquet(self, path: str, table: pa.Table) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, path)

    def _atomic(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _absolute(path: str) -> str:
    from pathlib import Path

    return str(Path(path).expanduser().resolve())
