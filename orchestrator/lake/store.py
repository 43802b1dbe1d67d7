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
complete, so a reader never sees half a file; a failed write removes its temporary. A part is
named by its task id, so a re-run task renames over its own part and never duplicates rows; runs
live under their own ``run_id=`` directories, so concurrent runs never touch each other's files.

Every Parquet file is committed with a checksum file next to it (``part-<task>.parquet.sha256``:
sha256, bytes, rows), written after the part. A truncated part, a flipped byte inside a value
(which a Parquet footer does not notice), or a part whose checksum never got written (a crash
between the two renames) all fail :meth:`Lake.verify_part`; ``orchestrator/lake/integrity.py`` turns
that into what readers may count and what a resume must redo.

Run ids become directory names, so they are checked against :data:`RUN_ID_PATTERN` wherever a
path is built from one: no id can leave the lake or nest partitions. The lake is any pyarrow
filesystem URI; plain paths are local.

Nothing inside a lake is reached through a symbolic link, for reading or for writing: a link
can point anywhere (another user's files, a folder outside the lake that a resume would clean
up). Every read, write, delete and listing of a local lake goes through this class, which lists
without following links (:meth:`Lake.files`) and refuses a path with a link on its way
(:meth:`Lake.guard`); ``kvorch status`` names each link (:meth:`Lake.links`) and leaves it alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.errors import KvorchError
from workers.contract.schema import CHUNK_COLUMNS_BY_VERSION, CHUNK_SCHEMA, DOC_SCHEMA, PARTITION_COLUMNS

DEFAULT_LAKE = "./kvorch-lake"
# A run id is one safe path component: never "..", never "/", never longer than a file name can be.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CHECKSUM_SUFFIX = ".sha256"
# Tries at the lake's write probe while another submission into the same new lake removes it, empty.
_PROBE_ATTEMPTS = 5


class LinkInLake(KvorchError):
    """A path of the lake passes through a symbolic link, which kvorch never follows."""

    def __init__(self, link: str) -> None:
        super().__init__(link_line(link))
        self.link = link


def link_line(link: str) -> str:
    """The one line that names a link inside a lake, and the fix."""
    return (
        f"{link} is a symbolic link inside the lake; kvorch neither reads nor writes through links: "
        "replace it with the files themselves, or remove it"
    )


def check_run_id(run_id: str, what: str = "--run-id") -> str:
    """``run_id`` if it is a safe directory name, else a one-line KvorchError naming the rule."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise KvorchError(
            f"{what} {run_id[:60]!r}{'...' if len(run_id) > 60 else ''} is not a valid run id: use 1 to 128 "
            "letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return run_id


class Lake:
    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        """``uri``: a directory or a pyarrow filesystem URI. ``filesystem`` overrides the one the
        URI implies, with ``uri`` then a path on it (a wrapped or instrumented filesystem). An empty
        ``uri`` is refused: as a path it would be the working directory."""
        if not str(uri).strip():
            raise KvorchError(
                f"the lake path is empty (--lake {uri!r}); pass the directory kvorch submit writes to, "
                f"e.g. --lake {DEFAULT_LAKE} (the default), or a pyarrow filesystem URI"
            )
        self.uri = uri
        if filesystem is not None:
            self.fs, self.root = filesystem, _absolute(uri)
        else:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, ValueError):
                self.fs, self.root = pafs.LocalFileSystem(), _absolute(uri)
            except OSError as exc:  # an object store out of reach (no network, no credentials): 35 lines once
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise KvorchError(
                    f"cannot open lake {uri}: {reason}; check the network and the store's credentials, "
                    "or pass a local directory"
                ) from None
        self.root = self.root.rstrip("/") or "/"
        # Links exist (and are refused) on local lakes only; object stores have none.
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # --- layout ---------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def run_dir(self, run_id: str) -> str:
        return self.path("runs", f"run_id={check_run_id(run_id, 'run id')}")

    def part_path(self, run_id: str, method: str, task_id: str) -> str:
        return self.path(
            "chunks", f"run_id={check_run_id(run_id, 'run id')}", f"method={method}", f"part-{task_id}.parquet"
        )

    def heads_dir(self, analysis_id: str) -> str:
        return self.path("heads", f"run_id={check_run_id(analysis_id, 'analysis id')}")

    def table_files(self, table: str) -> list[str]:
        """The Parquet files of ``docs``, ``scores`` or ``heads``: ``<table>/run_id=<id>/*.parquet``
        under a valid run id, never through a link; a folder kvorch does not make is not read."""
        base = self.path(table)
        return [
            path
            for path in self.files(base)
            if path.endswith(".parquet")
            and path.count("/") == base.count("/") + 2
            and _is_partition(path.rsplit("/", 2)[-2], "run_id")
        ]

    # --- checks ---------------------------------------------------------------------------

    def ensure_writable(self) -> None:
        """Fail before any work when the lake cannot be written. Leaves the filesystem as it
        found it: the probe file goes, and so do the directories it had to create, so a job
        refused later (a bad method, an unreachable cluster) leaves no empty lake behind."""
        probe = self.path(f".kvorch-write-probe-{uuid.uuid4().hex}")
        created = self.first_missing(self.root)
        try:
            self._write_probe(probe)
        except OSError as exc:
            if self.is_file():
                raise KvorchError(
                    f"lake {self.uri} is a file, not a directory; pass a directory for --lake (a new one is made), "
                    f"e.g. --lake {DEFAULT_LAKE}"
                ) from None
            raise KvorchError(
                f"cannot write to lake {self.uri} ({exc.strerror or exc}); pass a writable --lake"
            ) from None
        finally:
            self._discard(probe)
            if created is not None:
                self.remove_empty_dirs(self.root, up_to=created)

    def _write_probe(self, probe: str) -> None:
        """Make the lake's directory and write ``probe`` in it. Another submission starting into the
        same new lake may remove the directory, empty, between the two (its own probe's clean-up):
        the directory is then made again, a few times, before a missing directory counts."""
        for attempt in range(_PROBE_ATTEMPTS):
            self.fs.create_dir(self.root, recursive=True)
            try:
                with self.fs.open_output_stream(probe) as out:
                    out.write(b"ok")
                return
            except FileNotFoundError:
                if attempt == _PROBE_ATTEMPTS - 1:
                    raise

    def remove_empty_dirs(self, path: str, up_to: str) -> None:
        """Remove ``path`` and its parents up to ``up_to`` while each is empty. Never a recursive
        delete: another submission may have started writing into a lake this one just created."""
        while True:
            if self.link_on(path) or self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
                return
            try:
                self.fs.delete_dir(path)
            except OSError:
                return
            if path == up_to or "/" not in path.rstrip("/"):
                return
            path = path.rsplit("/", 1)[0]

    def first_missing(self, path: str) -> str | None:
        """The outermost directory of ``path`` that does not exist yet (None: it all exists)."""
        missing = None
        while path and self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            missing, parent = path, path.rsplit("/", 1)[0]
            if parent == path:
                break
            path = parent
        return missing

    def is_file(self) -> bool:
        """Whether the lake's own path is a file (a mistyped --lake), not a directory."""
        return self.fs.get_file_info(self.root).type == pafs.FileType.File

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_json(self, path: str, missing_ok: bool = True, damaged_ok: bool = False) -> dict | None:
        """A JSON file of the lake; None when it is missing (``missing_ok``) or, with
        ``damaged_ok``, not valid JSON or not an object. A damaged one is otherwise a one-line
        KvorchError; so is a path through a link (:meth:`guard`)."""
        self.guard(path)
        try:
            with self.fs.open_input_stream(path) as src:
                payload = json.loads(src.read())
        except FileNotFoundError:
            if missing_ok:
                return None
            raise KvorchError(f"{path} is missing") from None
        except (ValueError, UnicodeDecodeError) as exc:
            if damaged_ok:
                return None
            raise KvorchError(f"{path} is damaged (not JSON: {exc}); restore it or remove that run") from None
        if not isinstance(payload, dict):
            if damaged_ok:
                return None
            raise KvorchError(
                f"{path} is damaged (JSON {type(payload).__name__}, not an object); restore it or remove that run"
            )
        return payload

    def read_spec(self, run_id: str) -> dict | None:
        return self.read_json(self.run_dir(run_id) + "/spec.json")

    def read_status(self, run_id: str, damaged_ok: bool = True) -> dict | None:
        """status.json; a damaged one (a crash mid-write on a filesystem without atomic
        rename) reads as no status, which every reader treats as "not finished"."""
        return self.read_json(self.run_dir(run_id) + "/status.json", damaged_ok=damaged_ok)

    def parts(self, run_id: str | None = None) -> list[str]:
        """Every complete-named part of ``run_id`` (default: all runs), temporaries excluded."""
        base = self.path("chunks", f"run_id={run_id}") if run_id else self.path("chunks")
        depth = 2 if run_id else 3  # chunks/run_id=<id>/method=<m>/part-<task>.parquet
        return [
            path
            for path in self.files(base)
            if path.count("/") == base.count("/") + depth
            and path.rsplit("/", 1)[-1].startswith("part-")
            and path.endswith(".parquet")
            and _is_partition(path.rsplit("/", 3)[-3], "run_id")
            and _is_partition(path.rsplit("/", 2)[-2], "method")
        ]

    def files(self, base: str) -> list[str]:
        """Every file under ``base``, sorted, never through a link: a linked file or folder is
        not listed, nor anything under it (:meth:`links` names them)."""
        if not self.local:
            selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
            return sorted(i.path for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)
        if self.link_on(base):
            return []
        found: list[str] = []
        self._walk(base, lambda entry: found.append(entry.path) if entry.is_file(follow_symlinks=False) else None)
        return sorted(found)

    def links(self) -> list[str]:
        """Every symbolic link inside the lake (local lakes; none elsewhere), not followed."""
        found: list[str] = []
        if self.local:
            self._walk(self.root, lambda entry: found.append(entry.path) if entry.is_symlink() else None)
        return sorted(found)

    def _walk(self, base: str, visit) -> None:
        """Call ``visit`` on every entry under the local folder ``base``, descending into real
        folders only (never into a link)."""
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            visit(entry)
            if entry.is_dir(follow_symlinks=False):
                self._walk(entry.path, visit)

    def link_on(self, path: str) -> str | None:
        """The first symbolic link on ``path``'s way down from the lake's root (itself
        included), or None. The root is resolved when the lake is opened, so a lake that is
        itself reached through a link is the user's choice and fine."""
        if not self.local or not path.startswith(self.root.rstrip("/") + "/"):
            return None
        current = self.root.rstrip("/")
        for part in path[len(current) + 1 :].split("/"):
            current = f"{current}/{part}"
            if os.path.islink(current):
                return current
            if not os.path.lexists(current):
                return None
        return None

    def guard(self, path: str) -> str:
        """``path``, if no link lies on its way (:meth:`link_on`); else :class:`LinkInLake`.
        Every read, write and delete of the lake passes here."""
        link = self.link_on(path)
        if link is not None:
            raise LinkInLake(link)
        return path

    def verify_part(self, path: str, checksum_required: bool = True) -> tuple[int | None, str]:
        """(rows, "") for a sound part, (None, why) for a damaged one.

        Sound means: its bytes hash to its checksum file's sha256, and its footer has the lake's
        columns under a readable schema version. ``checksum_required=False`` is for runs written
        before checksums existed, whose parts have none: the footer check alone then decides.
        An empty part is sound: a method whose every config failed on every document of its task.
        """
        if self.link_on(path):
            return None, "a symbolic link, which kvorch never follows"
        try:
            with self.fs.open_input_stream(path) as src:
                data = src.read()
        except OSError as exc:
            return None, f"unreadable ({exc.strerror or exc})"
        recorded = self.read_json(path + CHECKSUM_SUFFIX, missing_ok=True, damaged_ok=True)
        if recorded is None and checksum_required:
            return None, "its checksum file is missing (a write that did not finish)"
        if recorded is not None and recorded.get("sha256") != hashlib.sha256(data).hexdigest():
            return None, f"checksum mismatch ({len(data)} bytes, {recorded.get('bytes')} committed)"
        try:
            meta = pq.read_metadata(pa.BufferReader(data))
        except (OSError, pa.ArrowException):
            return None, "not a readable Parquet file"
        columns = meta.schema.to_arrow_schema().remove_metadata()
        if not any(columns.equals(known) for known in CHUNK_COLUMNS_BY_VERSION.values()):
            return None, "not the lake's chunk schema"
        return meta.num_rows, ""

    @staticmethod
    def part_key(path: str) -> tuple[str, str]:
        """(task_id, method) of a part path."""
        method = path.rsplit("/", 2)[-2].split("=", 1)[1]
        return path.rsplit("/", 1)[-1][len("part-") : -len(".parquet")], method

    @staticmethod
    def part_run_id(path: str) -> str:
        return path.rsplit("/", 3)[-3].split("=", 1)[1]

    def delete(self, paths: list[str]) -> None:
        """Delete ``paths`` and, for parts, their checksum files."""
        for path in paths:
            self._discard(path)
            if path.endswith(".parquet"):
                self._discard(path + CHECKSUM_SUFFIX)

    def leftovers(self, run_id: str) -> list[str]:
        """What a killed or failed writer of this run left: temporaries (``*.tmp-*``, never
        read) and checksum files whose part is gone. Removed on resume."""
        files = self.files(self.path("chunks", f"run_id={check_run_id(run_id, 'run id')}"))
        present = set(files)
        return [
            path
            for path in files
            if ".tmp-" in path.rsplit("/", 1)[-1]
            or (path.endswith(CHECKSUM_SUFFIX) and path[: -len(CHECKSUM_SUFFIX)] not in present)
        ]

    def run_ids(self) -> list[str]:
        """The ids of the ``runs/run_id=<id>`` folders, linked ones left out (:meth:`links`)."""
        if self.link_on(self.path("runs")):
            return []
        selector = pafs.FileSelector(self.path("runs"), allow_not_found=True)
        return sorted(
            info.base_name.split("=", 1)[1]
            for info in self.fs.get_file_info(selector)
            if info.base_name.startswith("run_id=") and not self.link_on(info.path)
        )

    # --- writes ---------------------------------------------------------------------------

    def write_json(self, path: str, payload: dict) -> None:
        self._atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def write_spec(self, run_id: str, spec: dict) -> None:
        """spec.json; ``part_checksums`` tells readers that every part of this run has a
        checksum file, so one without is damaged (runs from before checksums have none)."""
        payload = {**spec, "run_id": run_id, "created_at": _now(), "part_checksums": "sha256"}
        self.write_json(self.run_dir(run_id) + "/spec.json", payload)

    def write_status(self, run_id: str, status: dict) -> None:
        self.write_json(self.run_dir(run_id) + "/status.json", {**status, "run_id": run_id, "finished_at": _now()})

    def docs_path(self, run_id: str) -> str:
        return self.path("docs", f"run_id={check_run_id(run_id, 'run id')}", "docs.parquet")

    def write_docs(self, run_id: str, docs: pa.Table) -> None:
        self._atomic_parquet(self.docs_path(run_id), docs.cast(DOC_SCHEMA))

    def docs_sound(self, run_id: str) -> bool:
        """Whether the run's docs.parquet is there whole: its bytes hash to its checksum file's
        (a resume rewrites it otherwise: part of a run's setup, which sql/retrieval.sql joins)."""
        path = self.docs_path(run_id)
        if self.link_on(path):
            return False
        recorded = self.read_json(path + CHECKSUM_SUFFIX, missing_ok=True, damaged_ok=True)
        try:
            with self.fs.open_input_stream(path) as src:
                data = src.read()
        except OSError:
            return False
        return recorded is not None and recorded.get("sha256") == hashlib.sha256(data).hexdigest()

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
        """The part, then its checksum file: a crash between the two leaves a part without a
        checksum, which :meth:`verify_part` calls damaged, so a resume redoes its task."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        self._atomic(path, data)
        checksum = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": table.num_rows}
        self._atomic(path + CHECKSUM_SUFFIX, json.dumps(checksum, sort_keys=True).encode())

    def _atomic(self, path: str, data: bytes) -> None:
        """Write under a temporary name, then rename; a failed write (disk full) removes its
        temporary, so nothing half-written outlives it."""
        tmp = f"{self.guard(path)}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, path)
        except BaseException:
            self._discard(tmp)
            raise

    def _discard(self, path: str) -> None:
        """Delete ``path`` if it is there, never through a link; a cleanup must never hide the
        error that caused it."""
        if self.link_on(path):
            return
        try:
            self.fs.delete_file(path)
        except OSError:
            pass


def _is_partition(folder: str, key: str) -> bool:
    """Whether ``folder`` is a ``key=<value>`` hive partition kvorch makes (a run id: a valid one).
    Folders of any other name (a user's notes, a copy) are never read as part of a table."""
    name, sep, value = folder.partition("=")
    if name != key or not sep or not value:
        return False
    return key != "run_id" or RUN_ID_PATTERN.fullmatch(value) is not None


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _absolute(path: str) -> str:
    from pathlib import Path

    return str(Path(path).expanduser().resolve())
