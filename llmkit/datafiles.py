"""Local data files: formats by extension, CoNLL, and the checks that name a bad file, line and fix before
(and after) the loader reads it (binary, not UTF-8, ragged CSV, bare JSON nulls, invalid JSON)."""

from __future__ import annotations

import re
from pathlib import Path

from llmkit.errors import DataError, first_line
from llmkit.files import atomic_write, cache_dir

FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".conll": "conll",
    ".bio": "conll",
    ".iob": "conll",
}


# --------------------------------------------------------------------------- CoNLL


def read_conll(path: str) -> dict[str, list]:
    """Parse a CoNLL file: `token<whitespace>...tag` per line, blank line between sentences, -DOCSTART- skipped."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []

    def flush() -> None:
        if words:
            tokens.append(list(words))
            tags.append(list(labels))
            words.clear()
            labels.clear()

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            flush()
        elif len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'token tag', got {line.strip()!r}")
        else:
            words.append(parts[0])
            labels.append(parts[-1])
    flush()
    return {"tokens": tokens, "ner_tags": tags}


def conll_as_jsonl(path: str) -> str:
    """A JSONL copy of a CoNLL file in llmkit's cache (keyed by path, size and mtime).

    Loading it with the json builder makes the data file-backed, so tokenization is cached by
    datasets' fingerprint and every rank of a distributed run reuses the main process's work.
    """
    import hashlib
    import json

    st = Path(path).stat()
    key = hashlib.sha256(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "conll" / f"{Path(path).stem}-{key}.jsonl"
    if not out.exists():
        rows = read_conll(path)
        lines = (
            json.dumps({"tokens": t, "ner_tags": g}) for t, g in zip(rows["tokens"], rows["ner_tags"], strict=True)
        )
        atomic_write(out, "".join(line + "\n" for line in lines))
    return str(out)


def format_of(split: str, paths: list[str]) -> str:
    exts = {Path(p).suffix.lower() for p in paths}
    unknown = [e for e in exts if e not in FORMATS]
    if unknown:
        raise DataError(
            f"unknown data file extension {unknown[0] or '(none)'} (data.{split}): "
            f"use one of {', '.join(sorted(FORMATS))}"
        )
    formats = {FORMATS[e] for e in exts}
    if len(formats) > 1:
        raise DataError(f"data.{split} mixes formats ({', '.join(sorted(formats))}); use one format per split")
    return formats.pop()


_HEAD = 65536  # bytes of each file checked before loading (the loader checks the rest)


def _not_utf8(where: str, e: UnicodeDecodeError, offset: int | None = None) -> DataError:
    at = f" at offset {offset:,}" if offset is not None else ""
    return DataError(
        f"{where} is not UTF-8 text (byte 0x{e.object[e.start]:02x}{at}); re-save it as UTF-8, "
        "e.g. iconv -f latin1 -t utf-8 OLD > NEW"
    )


def check_file(path: str, split: str, fmt: str) -> None:
    """Fail fast, naming the file and the fix, when a file is not what its extension says:
    binary, UTF-16, or text in another encoding than UTF-8. CSV files are checked for ragged rows."""
    import codecs

    where = f"{path} (data.{split})"
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if fmt == "parquet":
        if not head.startswith(b"PAR1"):
            raise DataError(f"{where} is not a Parquet file (no PAR1 header); re-export it as Parquet or use .jsonl")
        return
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # also the start of UTF-32's BOMs
        raise DataError(f"{where} is UTF-16 or UTF-32 text; re-save it as UTF-8")
    if b"\x00" in head:
        kind = {"text": "plain", "json": "JSON", "csv": "CSV", "conll": "CoNLL"}.get(fmt, fmt)
        raise DataError(f"{where} looks binary (it has NUL bytes), not {kind} text; point data.{split} at a UTF-8 file")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _HEAD)
    except UnicodeDecodeError as e:
        raise _not_utf8(where, e, e.start) from None
    if fmt == "csv":
        _check_csv_rows(path, where, delimiter_of(path))
    if fmt == "json" and not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        _check_json_null_lines(path, where)


# A JSON Lines row that is a bare `null`: pyarrow 26's JSON reader crashes the process (SIGSEGV) when
# one starts a parse block, so such a line is reported before the loader sees it. (The pattern starts
# with a literal newline so that re scans fast: ~400 MB/s.)
_NULL_LINE = re.compile(rb"\n[ \t\r]*null[ \t\r]*(?=\n)")


def _check_json_null_lines(path: str, where: str) -> None:
    lines_before, tail, first = 0, b"", True
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            block = tail + chunk
            if chunk:  # whole lines only; the rest waits for the next chunk
                cut = block.rfind(b"\n") + 1
                block, tail = block[:cut], block[cut:]
            if first and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            first = first and not block
            buf = b"\n" + block + (b"" if block.endswith(b"\n") else b"\n")
            found = _NULL_LINE.search(buf) if b"null" in block else None
            if found:
                line = lines_before + buf.count(b"\n", 0, found.start() + 1)
                raise DataError(
                    f"{where}, line {line}: a bare null where a JSON object is expected; remove the line "
                    "(JSON Lines has one object per line)"
                )
            if not chunk:
                return
            lines_before += block.count(b"\n")


DELIMITERS = (",", ";", "\t", "|")


def delimiter_of(path: str) -> str:
    """The field separator of a .csv/.tsv file: the extension's (comma, tab) unless the first 50 lines say
    otherwise. A separator counts when it splits the header into several fields and every line into as many
    (label files saved with `;` by spreadsheets in many locales, or `|`)."""
    import csv
    import io

    default = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        sample = [line for _, line in zip(range(50), f, strict=False)]
    text = "".join(sample[:-1] if len(sample) == 50 else sample)  # the 50th line may be cut by a quoted newline
    for candidate in (default, *(d for d in DELIMITERS if d != default)):
        rows = [row for row in csv.reader(io.StringIO(text), delimiter=candidate) if row]
        if rows and len(rows[0]) > 1 and all(len(row) == len(rows[0]) for row in rows):
            return candidate
    return default


def _check_csv_rows(path: str, where: str, delimiter: str) -> None:
    """Every row has the header's number of fields (pandas would drop a short row's cells silently)."""
    import csv
    import sys

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long document in one cell is fine
    reader = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next((row for row in reader if row), None)
            for row in reader:
                if row and header is not None and len(row) != len(header):
                    fields = f"{len(row)} field{'s' if len(row) != 1 else ''}"
                    fix = (
                        'a quote (") is never closed; close it'
                        if any("\n" in cell for cell in row)
                        else f"fix the row (quote a field that contains {delimiter!r})"
                    )
                    raise DataError(
                        f"{where}, line {reader.line_num}: {fields} where the header has {len(header)}; {fix}"
                    )
    except UnicodeDecodeError as e:
        raise _not_utf8(where, e) from None
    except csv.Error as e:
        line = f", line {reader.line_num}" if reader is not None else ""
        raise DataError(f"{where}{line}: malformed CSV ({first_line(e)}); fix the quoting") from None


_READ_FIXES = {
    "json": 'use JSON Lines (one object per line, e.g. {"text": "...", "label": "..."}) or one JSON array of objects',
    "csv": "fix the row (quote a field that contains the delimiter) or re-save it as CSV UTF-8",
    "text": "use UTF-8 text, one example per line",
    "parquet": "re-export it as Parquet, or use .jsonl/.csv",
}


def read_error(fmt: str, paths: list[str], split: str, e: BaseException) -> DataError:
    """One line for a file the loader could not read: the deepest cause, the file and the fix."""
    where = f"{', '.join(paths)} (data.{split})"
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for x in chain:
        if isinstance(x, UnicodeDecodeError):
            return _not_utf8(where, x)
    if any("corresponds to no data" in str(x) for x in chain):
        return DataError(f"{where} has no rows; add rows (under the header, for CSV)")
    if fmt == "json":
        for path in paths:
            located = _locate_json_error(path, split)
            if located is not None:
                return located
    msg = next((first_line(x) for x in reversed(chain) if str(x).strip()), type(e).__name__)
    return DataError(f"cannot read {where} as {fmt}: {msg}; {_READ_FIXES.get(fmt, 'check the file')}")


def _locate_json_error(path: str, split: str) -> DataError | None:
    """The first line of a JSON (Lines) file that is not a JSON object, as a DataError (error path only)."""
    import json

    where = f"{path} (data.{split})"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    if text.lstrip().startswith(("[", "{")) and not path.lower().endswith(".jsonl"):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return DataError(f"{where}, line {e.lineno}: invalid JSON ({e.msg}); fix it, or write JSON Lines")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return DataError(f"{where}, line {lineno}: invalid JSON ({e.msg}); JSON Lines has one object per line")
        if not isinstance(row, dict):
            return DataError(
                f"{where}, line {lineno}: a JSON {type(row).__name__}, not an object; "
                'JSON Lines has one object per line, e.g. {"text": "...", "label": "..."}'
            )
    return None
