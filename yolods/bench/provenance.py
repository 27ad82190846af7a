"""Which code measured a results line: its yolods commit and whether the tree was clean.

A line from a dirty tree (uncommitted changes under yolods/) measured code that no commit holds, so nobody can
rerun it. The bench records `source` in every line (results.run_context); lines written before that field existed
carry only `versions.yolods_commit`, with a `-dirty` suffix from the commit that added the check onwards, so
for them a clean state cannot be told from an unrecorded one and the report counts them as unrecorded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from yolods.bench import environment

CLEAN, DIRTY, UNRECORDED = "clean", "dirty", "unrecorded"
MAX_CHANGES_RECORDED = 20  # `git status` lines kept per line: enough to say what was uncommitted


def source_record() -> dict[str, Any] | None:
    """What results lines store as `source`: commit, dirty flag and the changed paths (None without git)."""
    state = environment.source_state()
    if state is None:
        return None
    return {
        "commit": state.commit,
        "dirty": bool(state.changes),
        "changes": list(state.changes[:MAX_CHANGES_RECORDED]),
        "num_changes": len(state.changes),
    }


def line_source(line: dict[str, Any]) -> tuple[str | None, str]:
    """(commit, state) of a results line, state one of CLEAN, DIRTY, UNRECORDED."""
    source = line.get("source")
    if source:
        return source.get("commit"), DIRTY if source.get("dirty") else CLEAN
    label = (line.get("versions") or {}).get("yolods_commit")
    if not label:
        return None, UNRECORDED
    if label.endswith("-dirty"):
        return label.removesuffix("-dirty"), DIRTY
    return label, UNRECORDED


@dataclass(frozen=True)
class Provenance:
    """How many lines each (commit, state) holds, over the lines a report reads."""

    counts: dict[tuple[str | None, str], int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, state: str) -> int:
        return sum(number for (_, line_state), number in self.counts.items() if line_state == state)

    @property
    def all_clean(self) -> bool:
        return self.count(CLEAN) == self.total


def provenance(lines: list[dict[str, Any]]) -> Provenance:
    return Provenance(counts=dict(Counter(line_source(line) for line in lines)))
