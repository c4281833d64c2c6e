"""Per-sample results of ``tokensieve eval``, appended as they come, so a run can resume.

``samples.jsonl`` starts with a header line naming what is evaluated (model, mode, samples,
...); every later line is one scored sample of one run (a method at a budget, or the
unpruned model). An interrupted evaluation reopened with the same settings skips the samples
already scored; reopened with different settings it is refused, so results never mix.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokensieve.data.vqa_files import VQAItem
from tokensieve.errors import TokensieveError

FILE = "samples.jsonl"


class SampleLog:
    """One evaluation's per-sample lines. fingerprint: what must match to resume."""

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.path = Path(folder) / FILE
        self.records: dict[str, dict[str, dict]] = {}
        if self.path.exists():
            self._read(fingerprint)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")

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
                self.path.write_text("".join(kept + "\n" for kept in lines[:-1]))
                break
            self.records.setdefault(record["run"], {})[record["id"]] = record

    def done(self, run: str) -> dict[str, dict]:
        """Scored items of ``run`` by question id."""
        return self.records.get(run, {})

    def append(self, run: str, items: list[VQAItem], predictions: list[str], scores: list[float],
               write: bool = True) -> None:
        """Record the ``predictions`` for ``items`` and their ``scores`` under ``run`` (flushed at
        once). write: False only remembers them (a process other than the one writing the file)."""
        rows = [{"run": run, "id": item.question_id, "family": item.family, "question": item.question,
                 "answers": item.answers, "prediction": p, "score": score}
                for item, p, score in zip(items, predictions, scores, strict=True)]
        if write:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            self.records.setdefault(run, {})[r["id"]] = r
