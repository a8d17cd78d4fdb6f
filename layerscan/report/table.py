"""``layerscan table``: gather row.md files into the supported-models table, or update one in place.

``update_docs_table`` touches only the table rows it replaces or inserts; every other byte of
the file, line endings included, stays as it was.
"""

from __future__ import annotations

from pathlib import Path

from layerscan.errors import UserError
from layerscan.report.outputs import ROW_HEADER


def read_rows(report_dirs: list[Path]) -> list[str]:
    rows = []
    for directory in report_dirs:
        row_file = directory / "row.md" if directory.is_dir() else directory
        if not row_file.is_file():
            raise UserError(f"no row.md in {directory}: is it a layerscan report directory?")
        rows.append(row_file.read_text(encoding="utf-8").strip() + "\n")
    return rows


def render_table(rows: list[str]) -> str:
    return ROW_HEADER + "".join(rows)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def update_docs_table(doc: Path, rows: list[str]) -> list[str]:
    """Replace each row whose Model or HF Models cell matches, else append it to the table.

    Returns "replaced"/"inserted" per row.  The table is the first one whose header has an
    ``ignored_layers`` column.
    """
    if not doc.is_file():
        raise UserError(f"docs file not found: {doc}")
    # Bytes, not read_text: universal-newline decoding would rewrite CRLF line endings.
    lines = doc.read_bytes().decode("utf-8").splitlines(keepends=True)
    header = next((i for i, l in enumerate(lines)
                   if l.lstrip().startswith("|") and "ignored_layers" in l), None)
    if header is None or header + 1 >= len(lines):
        raise UserError(f"{doc} has no supported-models table (a header with ignored_layers)")
    end = header + 2
    while end < len(lines) and lines[end].lstrip().startswith("|"):
        end += 1
    actions = []
    for row in rows:
        new = _cells(row)
        newline = "\r\n" if lines[header].endswith("\r\n") else "\n"
        text = row.strip() + newline
        match = next((i for i in range(header + 2, end)
                      if _cells(lines[i])[0] == new[0] or _cells(lines[i])[1] == new[1]), None)
        if match is None:
            if end > 0 and not lines[end - 1].endswith(("\n", "\r")):
                lines[end - 1] += newline
            lines.insert(end, text)
            end += 1
            actions.append("inserted")
        else:
            lines[match] = text
            actions.append("replaced")
    doc.write_bytes("".join(lines).encode("utf-8"))
    return actions
