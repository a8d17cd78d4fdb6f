"""Everything a run writes: recommendation.json, row.md, trials.csv, report.md and its PNGs."""
