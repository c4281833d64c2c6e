"""Scoring every item of an evaluation under a run name, through the sample log: items it holds
are read back, the rest answered batch by batch (shared among processes) and appended."""

from __future__ import annotations

from tqdm import tqdm

from tokensieve.attach import Handle
from tokensieve.backbones.stage_plan import PADDING
from tokensieve.data.vqa_files import VQAItem
from tokensieve.distributed import Distributed
from tokensieve.evaluate.eval_data import EvalData
from tokensieve.evaluate.intervals import accuracy_interval
from tokensieve.evaluate.predict import predict
from tokensieve.evaluate.sample_log import SampleLog
from tokensieve.evaluate.scoring import accuracy_summary, score
from tokensieve.interrupt import Interrupted


def _kept_per_row(handle: Handle, rows: int) -> list[dict[str, int]]:
    """Per row of the latest forward pass, the visual tokens each stage kept ``{str(stage): n}``."""
    if rows == 0:  # this process had no share of the batch: no forward pass
        return []
    per_stage = {}
    for stage in map(str, handle.stages):
        kept = handle.last_kept[stage]  # (rows, keep) patch indices, PADDING where a row kept fewer
        assert kept.shape[0] == rows, f"{stage} kept tokens for {kept.shape[0]} rows, not {rows}"
        per_stage[stage] = (kept != PADDING).sum(1).tolist()
    return [{stage: counts[r] for stage, counts in per_stage.items()} for r in range(rows)]


class Scorer:
    """Scores every item of ``data`` under a run name, through the log when there is one:
    items it holds are read back, the rest answered and appended batch by batch (an
    interruption loses at most one batch). With a handle, the tokens each stage kept for each
    item are logged and read back too (``item_kept``)."""

    def __init__(self, backbone, data: EvalData, log: SampleLog | None, batch_size: int,
                 progress: bool, dist: Distributed):
        self.backbone, self.data, self.log, self.batch_size, self.progress = backbone, data, log, batch_size, progress
        self.dist = dist
        self.item_scores: dict[str, list[float]] = {}  # run name -> score per item, in data order
        self.item_predictions: dict[str, dict[str, str]] = {}  # run name -> prediction per question id
        self.item_kept: dict[str, list[dict[str, int]]] = {}  # run name -> tokens kept per stage, per item

    def __call__(self, run: str, kept=None, handle: Handle | None = None) -> dict:
        items = self.data.items
        done = self.log.done(run) if self.log is not None else {}
        if handle is not None:  # a line written before counts were logged is scored again
            done = {qid: record for qid, record in done.items() if "kept" in record}
        todo = [item for item in items if item.question_id not in done]
        scores = {}
        predictions = {qid: record["prediction"] for qid, record in done.items()}
        kept_counts = {qid: record.get("kept") for qid, record in done.items()}
        step = self.batch_size * self.dist.world_size  # every process answers batch_size items a step
        try:
            for i in tqdm(range(0, len(todo), step), desc=run, unit="batch", leave=False,
                          disable=not self.progress or not todo or not self.dist.is_main):
                chunk = todo[i: i + step]
                mine = self.dist.shard(chunk)
                answers = predict(self.backbone, mine, kept, self.batch_size, max_new_tokens=self.data.max_new_tokens)
                counts = _kept_per_row(handle, len(mine)) if handle is not None else [None] * len(mine)
                by_id = dict(self.dist.gather([(item.question_id, (p, c))
                                               for item, p, c in zip(mine, answers, counts)]))
                answers = [by_id[item.question_id][0] for item in chunk]
                counts = [by_id[item.question_id][1] for item in chunk]
                chunk_scores = [score(p, item.answers) for item, p in zip(chunk, answers)]
                if self.log is not None:
                    self.log.append(run, chunk, answers, chunk_scores, kept=counts if handle is not None else None,
                                    write=self.dist.is_main)
                ids = [item.question_id for item in chunk]
                scores.update(zip(ids, chunk_scores))
                predictions.update(zip(ids, answers))
                kept_counts.update(zip(ids, counts))
        except KeyboardInterrupt:
            if self.log is None:
                raise
            raise Interrupted(f"interrupted while scoring {run}; the items scored so far are kept in {self.log.path}",
                              "rerun the same command to continue") from None
        scores.update((qid, record["score"]) for qid, record in done.items())
        self.item_kept[run] = [kept_counts[item.question_id] for item in items]
        self.item_scores[run] = [scores[item.question_id] for item in items]
        self.item_predictions[run] = predictions
        return {**accuracy_summary([item.family for item in items], self.item_scores[run]),
                **accuracy_interval(self.item_scores[run])}

    def examples(self, run: str, items: list[VQAItem]) -> dict:
        """``{"ids", "predictions", "scores"}`` of ``run`` on ``items`` (scored already)."""
        score_of = dict(zip((item.question_id for item in self.data.items), self.item_scores[run]))
        ids = [item.question_id for item in items]
        return {"ids": ids, "predictions": [self.item_predictions[run][i] for i in ids],
                "scores": [score_of[i] for i in ids]}
