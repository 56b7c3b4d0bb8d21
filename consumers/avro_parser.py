"""ClickHouse parses an Avro object container file into an Arrow table: the columnar decoder's engine.

With the embedded store (a `chdb://` DSN) the parse runs in the store's own chdb engine, on a connection of the
parser's own; with a ClickHouse server, the process has no engine of its own, so a process-local in-memory chdb
parses (chdb refuses a second engine while one on a path is open, so that one is made only for a server store).
The SQL is the same either way: `file()` reads the container from a temporary file, in /dev/shm when there is one.

Why a connection of its own: after a query fails, chdb hands what that query had already written (an Arrow
header) to the next query of the same connection, ahead of its own result. Refusals are part of this parser's job
(a corrupt body among good ones), so it keeps them away from the store client's queries and reads that leftover
out before its next parse.

The answer is uncompressed Arrow (ClickHouse compresses it by default, which both sides pay for), read in place:
the table's buffers point into chdb's result and keep it alive, since chdb frees that memory with the result.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

ROW_COLUMN = "_trainwire_row"
# ClickHouse errors that say the container's data is bad (a body), not that the engine could not work.
DATA_ERROR_CODES = frozenset({
    6,  # CANNOT_PARSE_TEXT
    27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  # CANNOT_READ_ALL_DATA
    69,  # ARGUMENT_OUT_OF_BOUND
    72,  # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
    128,  # TOO_LARGE_ARRAY_SIZE
    748,  # AVRO_EXCEPTION
})
_CODE = re.compile(r"Code: (\d+)")
_NOISE = re.compile(r"\s*\(in file/uri [^)]*\)|\s*While executing [A-Za-z]+")
_DANGLING = re.compile(r"(\s*[:.])+\s*(?=[.(]|$)")  # what the removed parts leave: " : : ." before "(CODE)"
_SETTINGS = (
    "output_format_arrow_string_as_string = 1, output_format_arrow_compression_method = 'none', "
    "output_format_arrow_use_native_writer = 1, schema_inference_use_cache_for_file = 0")


class AvroRefusedError(ValueError):
    """ClickHouse refused the container's data: some body in it is not what the schema says."""


class ParserUnavailableError(RuntimeError):
    """ClickHouse could not parse for a reason other than the data (memory, disk, a query it cannot run): the
    decoder falls back to the per-record path, which needs no engine."""


_local_engine = None
_local_lock = threading.Lock()


def _process_engine():
    """The process-local in-memory chdb, made on first use (it costs a few hundred MB)."""
    global _local_engine
    with _local_lock:
        if _local_engine is None:
            import chdb

            _local_engine = chdb.connect(":memory:")
        return _local_engine


def _arrow_buffer(result) -> pa.Buffer:
    """The query result's bytes as an Arrow buffer that keeps the result alive: tables read from it point into
    chdb's memory (no copy), which chdb frees with the result object."""
    view = result.get_memview().view()
    address = np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0
    return pa.foreign_buffer(address, view.nbytes, base=result)


def _scratch_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def clean_message(message: str) -> str:
    """ClickHouse's error without the temporary file's name and the pipeline's noise, on one line."""
    return " ".join(_DANGLING.sub(" ", _NOISE.sub("", message)).split())


class AvroParser:
    """Parses object container files with ClickHouse; built from the store's DSN (see the module docstring)."""

    def __init__(self, store_dsn: str):
        if store_dsn.startswith("chdb://"):
            import chdb

            # chdb compares engine paths literally, as clickhouse-connect does: the real path names the same engine
            self._conn = chdb.connect(os.path.realpath(urlsplit(store_dsn).path))
            self._lock = threading.Lock()
            self._own = True
        else:
            self._conn = _process_engine()
            self._lock = _local_lock
            self._own = False
        self._dir = _scratch_dir()

    def parse(self, container: bytes, select: str) -> pa.Table:
        """`SELECT <select> FROM` the container, as Arrow (strings as strings), in the container's row order.

        Raises AvroRefusedError when ClickHouse refuses the data, ParserUnavailableError when it fails otherwise."""
        try:
            fd, path = tempfile.mkstemp(suffix=".avro", prefix="trainwire-", dir=self._dir)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(container)
            except BaseException:
                os.unlink(path)
                raise
        except OSError as err:
            raise ParserUnavailableError(f"cannot write the batch for ClickHouse to parse: {err}") from err
        try:
            quoted = path.replace("\\", "\\\\").replace("'", "\\'")
            sql = f"SELECT {select}, _row_number AS {ROW_COLUMN} FROM file('{quoted}', Avro) SETTINGS {_SETTINGS}"
            with self._lock:
                try:
                    result = self._conn.query(sql, "Arrow")
                except Exception as err:
                    self._read_leftover()
                    raise self._failure(err) from err
            try:
                table = pa.ipc.open_file(_arrow_buffer(result)).read_all()
            except pa.ArrowException as err:
                raise ParserUnavailableError(f"ClickHouse's answer is not an Arrow file: {err}") from err
        finally:
            os.unlink(path)
        rows = table.column(ROW_COLUMN).to_numpy()
        table = table.drop_columns([ROW_COLUMN])
        if np.any(np.diff(rows) <= 0):  # a parallel pipeline may hand blocks over out of order
            table = table.take(np.argsort(rows, kind="stable"))
        return table

    def _read_leftover(self) -> None:
        """Consume what a failed query left on the connection (see the module docstring)."""
        for _ in range(3):
            try:
                if self._conn.query("SELECT 1", "TabSeparated").bytes() == b"1\n":
                    return
            except Exception:
                continue

    @staticmethod
    def _failure(err: Exception) -> Exception:
        message = clean_message(str(err))
        code = _CODE.search(message)
        if code and int(code.group(1)) in DATA_ERROR_CODES:
            return AvroRefusedError(message)
        return ParserUnavailableError(f"ClickHouse could not parse a batch: {message}")

    def close(self) -> None:
        """Release the connection to the store's engine (chdb opens another path only when none is open)."""
        if self._own:
            self._conn.close()
