"""Per-sample results of ``tokensieve eval``, appended as they come, so a run can resume.

``samples.jsonl`` starts with a header line naming what is evaluated (model, mode, samples,
...); every later line is one scored sample of one run (a method at a budget, or the
unpruned model), with what the report's figures need: the score and, for a pruned run, the
visual tokens each stage kept for it. An interrupted evaluation reopened with the same
settings skips the samples already scored and computes every figure from all the lines, so
it reports what an uninterrupted one would; reopened with different settings it is refused,
so results never mix.

Durability: each batch's lines go out in one write and are fsynced; a last line cut by a
crash is dropped by an atomic rewrite (temporary file, rename, fsync of file and folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokensieve.checkpoint import atomic_write_text, remove_stale_temporaries
from tokensieve.data.vqa_files import VQAItem
from tokensieve.errors import TokensieveError

FILE = "samples.jsonl"


class SampleLog:
    """One evaluation's per-sample lines. fingerprint: what must match to resume."""

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.path = Path(folder) / FILE
        self.records: dict[str, dict[str, dict]] = {}
        remove_stale_temporaries(self.path.parent, FILE)  # left by a repair a kill cut short
        if self.path.exists():
            self._read(fingerprint)
        else:
            atomic_write_text(self.path, json.dumps({"fingerprint": fingerprint}) + "\n")

    def _read(self, fingerprint: dict) -> None:
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])["fingerprint"]
        except (IndexError, KeyError, TypeError, json.JSONDecodeError):
            raise TokensieveError(f"{self.path} is not a tokensieve sample log; choose another --out") from None
        if header != fingerprint:
            differ = sorted(k for k in header.keys() | fingerprint.keys() if header.get(k) != fingerprint.get(k))
            raise TokensieveError(f"{self.path} holds an evaluation with other settings ({', '.join(differ)}); "
                                  "choose another --out to start a new one")
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise TokensieveError(f"{self.path} line {number} is not JSON") from None
                # The last line was cut short by the interruption: drop it, that sample is scored again.
                atomic_write_text(self.path, "".join(kept + "\n" for kept in lines[:-1]))
                break
            self.records.setdefault(record["run"], {})[record["id"]] = record

    def done(self, run: str) -> dict[str, dict]:
        """Scored items of ``run`` by question id."""
        return self.records.get(run, {})

    def append(self, run: str, items: list[VQAItem], predictions: list[str], scores: list[float],
               kept: list[dict[str, int]] | None = None, write: bool = True) -> None:
        """Record the ``predictions`` for ``items`` and their ``scores`` under ``run`` (one write,
        fsynced at once). kept: per item, the visual tokens each stage kept (``{str(stage): n}``).
        write: False only remembers them (a process other than the one writing the file)."""
        rows = [{"run": run, "id": item.question_id, "family": item.family, "question": item.question,
                 "answers": item.answers, "prediction": p, "score": score}
                for item, p, score in zip(items, predictions, scores, strict=True)]
        if kept is not None:
            for row, counts in zip(rows, kept, strict=True):
                row["kept"] = counts
        if write:
            with self.path.open("ab") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
                f.flush()
                os.fsync(f.fileno())
        for r in rows:
            self.records.setdefault(run, {})[r["id"]] = r
