"""The report's proxy section: proxy rankings next to full evaluations, and their correlation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


# --- rank correlation and the report section ---------------------------------------------------

def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None below three points or
    when either side is constant."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


@dataclass
class RankRow:
    pattern: str
    layer_local: float | None = None
    e2e: float | None = None
    full: float | None = None  # quality loss with this group alone in BF16 (complete records)
    ranks: dict = field(default_factory=dict)


def ranking_rows(entries: list[dict], records, criterion) -> list[RankRow]:
    """Proxy scores next to the full evaluation of each group alone in BF16, when on record.

    Every ranking sorts the most helpful group first: the largest layer-local error, the
    smallest end-to-end error with the group kept, the smallest quality loss with it kept.
    """
    full = {}
    for r in records:
        if r.config is not None and len(r.config) == 1 and r.status == "complete" \
                and criterion.metric in r.mean:
            full[r.config[0]] = criterion.loss(r.mean[criterion.metric])
    rows = [RankRow(e["pattern"], e.get("layer_local"), e.get("e2e"), full.get(e["pattern"]))
            for e in entries]
    for attr, sign in (("layer_local", -1.0), ("e2e", 1.0), ("full", 1.0)):
        known = [r for r in rows if getattr(r, attr) is not None]
        for row, rank in zip(known, _ranks([sign * getattr(r, attr) for r in known])):
            row.ranks[attr] = rank
    return rows


def correlations(rows: list[RankRow]) -> dict[str, float | None]:
    out = {}
    for proxy in ("layer_local", "e2e"):
        both = [r for r in rows if proxy in r.ranks and "full" in r.ranks]
        out[proxy] = spearman([r.ranks[proxy] for r in both], [r.ranks["full"] for r in both])
    return out


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _rank(row: RankRow, attr: str) -> str:
    rank = row.ranks.get(attr)
    return "" if rank is None else f" ({rank:g})"


def report_section(notes: dict, records, criterion) -> list[str]:
    """Markdown lines: the proxy rankings, their rank correlation with full evaluations, costs."""
    proxy = notes.get("proxy")
    if not proxy:
        return []
    decisions = ["Decisions:", ""] + [f"- {line}" for line in proxy["log"]] + [""] if proxy.get("log") else []
    cost = proxy.get("cost")
    if cost is None:  # FP8 everywhere passed (or there were no groups): nothing to rank
        return ["## Proxy sensitivity", "", "No proxy was measured: with FP8 everywhere meeting the "
                "criterion there is no group to rank.", ""] + decisions
    out = ["## Proxy sensitivity", "",
           f"Strategy `auto` replayed {cost['samples']} recorded BF16 DiT call(s) (of "
           f"{cost['full_evaluation_calls']} per full evaluation: "
           + ("" if cost["full_evaluation_calls"] == cost["images"] * cost["calls_per_image"]
              else "over every setting; recorded at the first, ")
           + f"{cost['images']} image(s) × {cost['calls_per_image']} calls) instead of generating "
           "images. Layer-local: relative "
           "FP8 error of every quantizable layer on its BF16 input (higher = more sensitive); "
           "end-to-end: relative DiT output error with that group alone in BF16 and the rest in "
           "FP8 (lower = keeping it helps more); full: "
           f"{criterion.metric} of the full evaluation with that group alone in BF16, where one is "
           "on record. Ranks in parentheses, most helpful first.", ""]
    for title, key in (("Groups", "groups"), ("Refinement cells", "cells")):
        entries = proxy.get(key) or []
        if not entries:
            continue
        rows = ranking_rows(entries, records, criterion)
        out += [f"**{title}**", "",
                f"| pattern | layer-local | end-to-end | full ({criterion.metric} mean) |",
                "|---|---|---|---|"]
        for row in rows:
            full = None if row.full is None else -row.full if criterion.loss(1.0) < 0 else row.full
            out.append(f"| `{row.pattern}` | {_num(row.layer_local)}{_rank(row, 'layer_local')} | "
                       f"{_num(row.e2e)}{_rank(row, 'e2e')} | {_num(full)}{_rank(row, 'full')} |")
        rho = correlations(rows)
        text = "; ".join(f"{name}: {'n/a (fewer than 3 groups with both)' if v is None else f'{v:+.2f}'}"
                         for name, v in (("layer-local", rho["layer_local"]), ("end-to-end", rho["e2e"])))
        out += ["", f"Spearman rank correlation with the full-evaluation ranking — {text}.", ""]
    out += [f"Proxy cost: {cost['calls']:g} DiT calls = **{cost['full_evaluations']:.3f} full-evaluation "
            f"equivalents** ({cost['seconds']:.1f} s measured now"
            + (f"; {cost['record_calls']:g} of the calls recorded the trajectory, the BF16 reference "
               "row being on record already" if cost.get("record_calls") else "")
            + (f"; {cost['cached_calls']:g} calls answered from the proxy cache" if cost["cached_calls"] else "")
            + ").", ""]
    return out + decisions


def evaluation_cost(records, images: int) -> dict:
    """Configurations evaluated and their cost in full evaluations (a stopped one counts the
    prompts it generated)."""
    fp8 = [r for r in records if r.config is not None]
    # A failed configuration also spent the prompt it failed on.
    generated = sum(min(images, len(r.per_prompt) + (r.status == "failed")) for r in fp8)
    return dict(configurations=len(fp8), stopped=sum(r.status == "stopped" for r in fp8),
                full_evaluations=generated / images if images else 0.0)
