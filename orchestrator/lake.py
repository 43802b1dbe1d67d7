"""The result lake: layout, atomic part writes, and run bookkeeping.

```
<lake>/runs/run_id=<id>/spec.json      job spec, versions, hardware, configs
<lake>/runs/run_id=<id>/status.json    running (driver, heartbeat), then finished / failed / interrupted
<lake>/chunks/run_id=<id>/method=<m>/part-<task>.parquet
<lake>/docs/run_id=<id>/docs.parquet
<lake>/heads/run_id=<id>/heads.parquet    `kvorch heads analyze`: one row per (layer, head)
<lake>/heads/run_id=<id>/analysis.json    what was analysed, and how
```
Parts are written under a name readers do not match (``*.parquet.tmp-*``) and renamed when
complete, so a reader never sees half a file. A part is named by its task id, so a re-run task
renames over its own part and never duplicates rows; runs live under their own ``run_id=``
directories, so concurrent runs never touch each other's files. On filesystems without atomic
rename, a crash can still leave a damaged part: :meth:`Lake.valid_parts` checks every footer and
readers and resumes skip what fails. The lake is any pyarrow filesystem URI; plain paths are local.
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
from workers.schema import CHUNK_COLUMNS_BY_VERSION, CHUNK_SCHEMA, DOC_SCHEMA, PARTITION_COLUMNS

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

    def heads_dir(self, analysis_id: str) -> str:
        return self.path("heads", f"run_id={analysis_id}")

    def glob(self, table: str) -> str:
        """The glob DuckDB reads a table from (local lakes)."""
        folder, depth = {
            "chunks": ("chunks", "*/*/*.parquet"),
            "docs": ("docs", "*/*.parquet"),
            "scores": ("scores", "*/*.parquet"),
            "heads": ("heads", "*/*.parquet"),
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

    def read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as src:
                return json.loads(src.read())
        except FileNotFoundError:
            return None

    def read_spec(self, run_id: str) -> dict | None:
        return self.read_json(self.run_dir(run_id) + "/spec.json")

    def read_status(self, run_id: str) -> dict | None:
        return self.read_json(self.run_dir(run_id) + "/status.json")

    def parts(self, run_id: str | None = None) -> list[str]:
        """Every complete-named part of ``run_id`` (default: all runs), temporaries excluded."""
        base = self.path("chunks", f"run_id={run_id}") if run_id else self.path("chunks")
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        return sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.startswith("part-") and info.path.endswith(".parquet")
        )

    def part_rows(self, path: str) -> int | None:
        """A part's row count from its footer, or None when the part is damaged (truncated,
        not Parquet, or not the lake's schema under any readable version). An empty part is
        valid: a method whose every config failed on every document of its task."""
        try:
            meta = pq.read_metadata(path, filesystem=self.fs)
        except (OSError, pa.ArrowException):
            return None
        columns = meta.schema.to_arrow_schema().remove_metadata()
        ok = any(columns.equals(known) for known in CHUNK_COLUMNS_BY_VERSION.values())
        return meta.num_rows if ok else None

    def valid_parts(self, run_id: str | None = None) -> list[str]:
        return [p for p in self.parts(run_id) if self.part_rows(p) is not None]

    def inventory(self, run_id: str) -> tuple[dict[tuple[str, str], int], list[str]]:
        """Valid parts of a run as {(task_id, method): rows}, and the paths of damaged ones."""
        valid: dict[tuple[str, str], int] = {}
        damaged = []
        for path in self.parts(run_id):
            rows = self.part_rows(path)
            if rows is None:
                damaged.append(path)
                continue
            method = path.rsplit("/", 2)[-2].split("=", 1)[1]
            valid[(path.rsplit("/", 1)[-1][len("part-") : -len(".parquet")], method)] = rows
        return valid, damaged

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            self.fs.delete_file(path)

    def temporaries(self, run_id: str) -> list[str]:
        """Leftovers of a killed writer of this run (``*.tmp-*``): never read, removed on resume."""
        selector = pafs.FileSelector(self.path("chunks", f"run_id={run_id}"), recursive=True, allow_not_found=True)
        return [i.path for i in self.fs.get_file_info(selector) if ".tmp-" in i.base_name]

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

    def write_rows(self, run_id: str, task_id: str, rows: pa.Table, methods: list[str] | None = None) -> int:
        """Write a task's rows as one part per method; returns the number of rows written.

        ``methods`` (default: those of ``rows``) are the task's: one without rows, whose every
        config failed on every document, gets an empty part, so the task still counts as done.
        """
        for method in sorted(set(rows.column("method").to_pylist()) | set(methods or ())):
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
