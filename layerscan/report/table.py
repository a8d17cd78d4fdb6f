"""The supported-models table row, in whichever columns the target table has.

vLLM-Omni's FP8 page has had two headers: today's
``| Model | HF models | Online | Pre-calibrated | Recommendation | ignored_layers | Text-Encoder quantization |``
and the seed guide's ``| Model | HF Models | DiT FP8 | Text Encoder FP8 | VAE FP8 | ignored_layers |``.
A run stores its row as cells by column key (``recommendation.json``'s ``table_row``);
``render_row`` writes them in any header's order.  ``update_docs_table`` touches only the rows
it replaces or inserts: every other byte of the file, line endings included, stays.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from layerscan.errors import UserError

YES = "✅︎"  # as vLLM-Omni's docs write it (U+2705 U+FE0E)
NO = "—"

# Normalised header text -> the row key that fills it.
COLUMNS = {
    "model": "model", "hf models": "hf_models", "online": "online",
    "pre-calibrated": "pre_calibrated", "recommendation": "recommendation",
    "ignored_layers": "ignored_layers", "text-encoder quantization": "text_encoder_quantization",
    "dit fp8": "dit_fp8", "text encoder fp8": "text_encoder_fp8", "vae fp8": "vae_fp8",
}
HEADERS = {
    "vllm-omni": ("| Model | HF models | Online | Pre-calibrated | Recommendation | `ignored_layers` | Text-Encoder quantization |\n"
                  "|-------|-----------|:-------:|:------:|----------------|------------------|------------------|\n"),
    "seed": ("| Model | HF Models | DiT FP8 | Text Encoder FP8 | VAE FP8 | `ignored_layers` |\n"
             "|-------|-----------|:-------:|:----------------:|:-------:|------------------|\n"),
}


def table_row(display_name: str, model_id: str, loaded, record, criterion: str) -> dict:
    """Cells by column key for a run whose recommendation is ``record`` (None: nothing passed)."""
    from layerscan.report.outputs import kept_by_component

    index = loaded.index
    quantized = {c.attr for c in loaded.profile.components}
    if record is None:
        kept: dict = {}
        ignored, online = "TBD", "No"
        advice = f"Keep BF16: no FP8 configuration met {criterion} (see the layerscan report)"
    else:
        kept = kept_by_component(record.config or (), index)
        online = "Yes"
        # A component kept whole shows in its own column (or in the per-component config), not
        # as a pattern.
        patterns = [p for p in record.config or () if not p.endswith(":")]
        whole = [p[:-1] for p in record.config or () if p.endswith(":")]
        ignored = ", ".join(f"`{p}`" for p in patterns) if patterns else "None"
        kept_text = ", ".join([f"`{p}`" for p in patterns] + [f"the whole {c}" for c in whole])
        advice = "All layers" if not record.config else f"Keep {kept_text} in BF16"

    def fp8(component: str) -> bool:  # quantized by the profile and not kept whole
        return component in quantized and record is not None and kept.get(component, []) is not None

    def text_encoder_cell() -> str:
        if fp8("text_encoder") and index.method("text_encoder") != "storage":
            return YES
        if "text_encoder" in loaded.components and "text_encoder" not in loaded.profile.target_quantizes:
            return f"No ({loaded.profile.target.name} does not quantize it)"
        return ""

    return {
        "model": display_name, "model_id": model_id, "hf_models": f"`{model_id}`",
        "online": online, "pre_calibrated": None, "recommendation": advice,
        "ignored_layers": ignored,
        "text_encoder_quantization": text_encoder_cell(),
        "dit_fp8": YES if fp8("transformer") else NO,
        "text_encoder_fp8": YES if fp8("text_encoder") else NO,
        "vae_fp8": YES if fp8("vae") else NO,
    }


def _normalise(header_cell: str) -> str:
    return re.sub(r"\s+", " ", header_cell.replace("`", "").strip().lower())


def cells_of(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def column_keys(header_line: str, where: str) -> list[str]:
    """The row key of every column of a header; a column it cannot fill is a one-line error."""
    keys = []
    for cell in cells_of(header_line):
        key = COLUMNS.get(_normalise(cell))
        if key is None:
            raise UserError(f"{where}: cannot fill the table column {cell!r}; layerscan knows "
                            + ", ".join(sorted({c for c in COLUMNS})))
        keys.append(key)
    return keys


def render_row(row: dict, keys: list[str], existing: list[str] | None = None) -> str:
    """The row's cells in ``keys`` order.  A cell the run has no value for (``None``: e.g.
    Pre-calibrated, which a run does not measure) keeps the existing row's value, else stays
    empty."""
    cells = []
    for i, key in enumerate(keys):
        value = row.get(key)
        if value is None:
            value = existing[i] if existing is not None and i < len(existing) else ""
        cells.append(value)
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _header_of(data: dict) -> str:
    """The docs header of the target a recommendation was written for."""
    from layerscan.profiles import resolve_target

    return resolve_target(data["target"]).header


def read_rows(report_dirs: list[Path]) -> list[dict]:
    rows = []
    for directory in report_dirs:
        row, data = _final_answer(directory, "table_row", "a table row")
        rows.append(dict(row, _header=_header_of(data)))
    return rows


def read_ci_entries(report_dirs: list[Path]) -> str:
    """The quality-test entries of final reports, merged per model across GPUs, as Python."""
    from layerscan.report.ci_entry import merge_by_gpu, render_entry

    entries = [_final_answer(directory, "ci_entry", "a CI entry")[0] for directory in report_dirs]
    return "\n".join(render_entry(entry) for entry in merge_by_gpu(entries))


def _final_answer(directory: Path, key: str, what: str):
    """``recommendation.json``'s ``key`` from a report directory, refused unless the answer is final."""
    path = directory / "recommendation.json" if directory.is_dir() else directory
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        value = data[key]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"no layerscan recommendation.json with {what} in {directory}: "
                        "is it a layerscan report directory written by this version?") from None
    if data.get("final") is not True:
        raise UserError(f"{directory}: not a final answer "
                        f"({data.get('not_final_because') or 'written without a stop reason'}); "
                        f"finish the run before publishing its {what.removeprefix('a ')}")
    return value, data


def render_table(rows: list[dict], header: str | None = None) -> str:
    """The whole table under ``header`` (default: the header of the first row's target)."""
    header = header or HEADERS[rows[0]["_header"] if rows else "vllm-omni"]
    keys = column_keys(header.splitlines()[0], "table header")
    return header + "".join(render_row(row, keys) + "\n" for row in rows)


def update_docs_table(doc: Path, rows: list[dict]) -> list[str]:
    """Replace each row whose Model or HF models cell matches, else append it to the table, in
    the columns of the table already in ``doc``.  Returns "replaced"/"inserted" per row.

    The table is the first one whose header has an ``ignored_layers`` column.
    """
    if not doc.is_file():
        raise UserError(f"docs file not found: {doc}")
    # Bytes, not read_text: universal-newline decoding would rewrite CRLF line endings.
    lines = doc.read_bytes().decode("utf-8").splitlines(keepends=True)
    header = next((i for i, l in enumerate(lines)
                   if l.lstrip().startswith("|") and "ignored_layers" in l), None)
    if header is None or header + 1 >= len(lines):
        raise UserError(f"{doc} has no supported-models table (a header with ignored_layers)")
    keys = column_keys(lines[header], str(doc))
    newline = "\r\n" if lines[header].endswith("\r\n") else "\n"
    end = header + 2
    while end < len(lines) and lines[end].lstrip().startswith("|"):
        end += 1
    model_col, hf_col = keys.index("model"), keys.index("hf_models") if "hf_models" in keys else None
    actions = []
    for row in rows:
        model_id = row.get("model_id", "")

        def same(line: str) -> bool:
            cells = cells_of(line)
            by_name = len(cells) > model_col and cells[model_col] == row.get("model")
            by_id = (hf_col is not None and len(cells) > hf_col and model_id
                     and f"`{model_id}`" in cells[hf_col])
            return by_name or bool(by_id)

        match = next((i for i in range(header + 2, end) if same(lines[i])), None)
        if match is None:
            if end > 0 and not lines[end - 1].endswith(("\n", "\r")):
                lines[end - 1] += newline
            lines.insert(end, render_row(row, keys) + newline)
            end += 1
            actions.append("inserted")
        else:
            ending = newline if lines[match].endswith(("\n", "\r")) else ""
            lines[match] = render_row(row, keys, cells_of(lines[match])) + ending
            actions.append("replaced")
    doc.write_bytes("".join(lines).encode("utf-8"))
    return actions
