"""Small helpers shared by the eval report modules (no transformers, no sparsekit core).

:mod:`sparsekit.eval.report`, :mod:`sparsekit.eval.report_extra` and
:mod:`sparsekit.eval.verdict` all import from here, so none of them imports another's internals.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["pyplot", "load_jsonl", "load_json", "load_retrieval", "complete_records", "write_csv", "RESULT_FILES", "has_results"]

# the raw result files the eval commands write (everything else in a results folder is rebuilt from them)
RESULT_FILES = ("retrieval.jsonl", "ppl.json", "fidelity.json", "locality.json")


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed (plots are skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def load_jsonl(path: Path) -> list:
    """Records of a JSON-lines file (blank lines skipped); ``[]`` when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_json(path: Path, default=None):
    """The parsed JSON file, or ``default`` when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def write_csv(rows: list, path: Path) -> None:
    """Write dict rows to CSV (columns: the union of keys, in first-seen order); nothing when ``rows`` is empty."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def has_results(out: Path) -> bool:
    """True when the folder holds at least one raw result file of ``sparsekit eval``."""
    out = Path(out)
    return any((out / name).exists() for name in RESULT_FILES)


def _dedupe(records: list) -> list:
    """First record of each (length, sample, context, config, question): parallel workers may overlap."""
    seen, out = set(), []
    for r in records:
        key = (r["length"], r["sample"], r.get("context", ""), r["config"], r["q"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def load_retrieval(out: Path) -> tuple:
    """``(records, meta)`` of ``retrieval.jsonl`` / ``retrieval_meta.json`` under ``out``, deduplicated.

    Records written before they named their context get it from the meta's layout (``shared``).
    ``([], {})`` when there are no retrieval results.
    """
    out = Path(out)
    records = load_jsonl(out / "retrieval.jsonl")
    meta = load_json(out / "retrieval_meta.json", {}) if records else {}
    for r in records:
        r.setdefault("context", "" if meta.get("shared", True) else r["task"])
    return _dedupe(records), meta


def complete_records(records: list) -> list:
    """Records (of one length) of the samples that every config finished, so comparisons stay paired.

    A sample is ``(sample index, context)``; configs are the records' ``config`` labels.
    """
    per_cfg: dict = {}
    for r in records:
        per_cfg.setdefault(r["config"], set()).add((r["sample"], r.get("context", "")))
    if not per_cfg:
        return []
    full = set.intersection(*per_cfg.values())
    return [r for r in records if (r["sample"], r.get("context", "")) in full]
