"""Accuracy of a LLaVA model with reduction methods attached, next to the unpruned model."""

from __future__ import annotations

import statistics

from tqdm import tqdm

from tokensieve.attach import Handle, attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.llava_prompt import prompt
from tokensieve.backbones.stage_plan import PADDING
from tokensieve.data.synthetic_eval import object_oracle, scene_spec_for
from tokensieve.data.vqa_files import VQAItem
from tokensieve.distributed import Distributed
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.eval_data import EvalData
from tokensieve.evaluate.flops import TokenCounts, prefill_flops, token_counts
from tokensieve.evaluate.intervals import accuracy_interval
from tokensieve.evaluate.latency import kv_cache_bytes, measure_latency
from tokensieve.evaluate.matching import MATCH_BY, matched_budget
from tokensieve.evaluate.paired import paired_difference
from tokensieve.evaluate.predict import predict
from tokensieve.evaluate.sample_log import SampleLog
from tokensieve.evaluate.scoring import accuracy_summary, score
from tokensieve.interrupt import Interrupted
from tokensieve.method import Budget

FLOPS_STAGES = ("vision", "projector", "llm", "lm_head", "total")


def median_text_tokens(backbone: LlavaBackbone, items: list[VQAItem]) -> int:
    """Median non-image tokens of the items' prompts (the prompt length FLOPs are reported for)."""
    tok = backbone.processor.tokenizer
    lengths = [sum(t != backbone.image_token_id for t in tok(prompt(i.question))["input_ids"]) for i in items]
    return int(statistics.median(lengths))


def cost_fields(backbone: LlavaBackbone, text_tokens: int, handle: Handle | None = None,
                counts: TokenCounts | None = None) -> dict:
    """``flops`` per stage, ``tokens_per_llm_layer``, ``visual_tokens_mean_llm`` (visual tokens
    averaged over the LLM's layers) and ``kv_cache_bytes`` (bf16) of one prefill, as the
    handle's latest forward pass reduced it (the unpruned model without a handle), or for the
    given ``counts``."""
    counts = counts or token_counts(backbone, text_tokens, handle)
    flops = prefill_flops(backbone.config, *counts)
    mean_visual = statistics.mean(counts.llm_tokens) - text_tokens
    return {"flops": {k: flops[k] for k in FLOPS_STAGES}, "tokens_per_llm_layer": counts.llm_tokens,
            "visual_tokens_mean_llm": round(mean_visual, 2),
            "kv_cache_bytes": kv_cache_bytes(backbone.config, counts.llm_tokens)}


def timing_fields(backbone: LlavaBackbone, samples: list[VQAItem], kept=None, progress: bool = False) -> dict:
    """Measured latency on ``samples`` (none: every field None, the timing was not asked for)."""
    if not samples:
        return {"ttft_ms": None, "ttft_ms_iqr": None, "decode_ms_per_token": None, "decode_ms_per_token_iqr": None,
                "peak_memory_mb": None}
    return measure_latency(backbone, samples, kept=kept, progress=progress)


def compare_methods(backbone: LlavaBackbone, data: EvalData, methods: list[str | dict], budgets: list[str],
                    mode: str = "hard", site: str | None = None, batch_size: int = 64, progress: bool = True,
                    pruner=None, centres: list[str] | None = None, oracle: bool = False, log: SampleLog | None = None, timing_samples: int = 8,
                    kept_examples: int = 0, dist: Distributed | None = None, match: str | None = None,
                    pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """Rows ``{method, site, budget, visual_tokens_kept, accuracy, per_family, flops, flops_ratio,
    tokens_per_llm_layer}``; the first row is the unpruned model (``method`` ``"none"``),
    measured on the same items of ``data``. FLOPs are for one prefill of the median prompt.
    Accuracy is the VQA score of :func:`tokensieve.evaluate.scoring.score` (exact match after
    the official normalisation; the soft score for 10 annotator answers).

    pruner: optional trained :class:`tokensieve.pruner.TwoStagePruner`, evaluated as ``two_stage``
    at each of ``centres`` (tokens entering the LLM, the merger's centres: counts or ratios of the
    patch tokens; none: once as trained, budget ``"trained"``; its heads keep their trained shares);
    each such row gets ``paired``, its paired comparison with every other pruned row at that
    budget (``{against, accuracy, difference, better, worse, p_value}``, :mod:`.paired`), and
    every other pruned row gets ``two_stage_at_cost``: the same comparison with the two-stage
    row of the most prefill FLOPs that are still no more than its own (None: none that cheap).
    oracle: add the object oracle at each of ``budgets`` and ``centres`` (``object_oracle``: tokens
    on objects only, one per object before a second; fewer than the budget when the objects cover fewer);
    synthetic data only.
    log: per-item results (with the tokens each stage kept) are appended there batch by batch,
    and items it already holds are not scored again; every figure comes from all its items, so
    an interrupted evaluation resumes to the report an uninterrupted one gives.
    timing_samples: how many items (one at a time) give every row's measured ``ttft_ms``,
    ``decode_ms_per_token`` (medians, with ``[q1, q3]`` in ``*_iqr``) and ``peak_memory_mb``
    (CUDA only); 0 leaves them None.
    kept_examples: for the first that many items, every pruned row gets ``kept_tokens``:
    ``{"ids": [question ids], "stages": {stage: [patch indices kept, per item]}}`` (-1: CLS),
    and every row ``examples``: ``{"ids", "predictions", "scores"}`` on those items.
    Every row has ``n`` (items scored) and ``accuracy_ci95``, the Wilson 95% interval
    ``[lo, hi]`` of its accuracy (:mod:`.intervals`).
    Every row also has ``kv_cache_bytes``, the bf16 KV cache after one prefill.
    dist: under ``torchrun`` / ``accelerate launch``, each process answers its share of every
    batch and the answers are gathered, so every process returns the same rows (only the main
    one writes the log).
    match: ``"tokens"`` or ``"flops"``: each method's budget (a token count at its site) is the one
    whose planned visual tokens averaged over the LLM's layers, or prefill FLOPs, are nearest a
    target (:mod:`.matching`): with a pruner, the two-stage row's measured value at each of its
    ``centres`` (those rows run first; ``budgets`` is not used); otherwise each ``budgets`` value
    (tokens: a count or share of the visual tokens; flops: a share of the unpruned prefill). Such rows get ``matched``: ``{by, to,
    target, planned}`` (``to``: the budget matched, by which rows are paired).
    methods: names, or configs ``{"name": ..., parameter: value}`` (a row is labelled by the name).
    pairs: the ``(method, budget)`` rows to measure, instead of every method at every budget.
    """
    if oracle and data.scenes is None:
        raise TokensieveError("--oracle needs the synthetic set: the object oracle knows where its objects are")
    if match is not None and match not in MATCH_BY:
        raise TokensieveError(f"cannot match by {match!r}; expected one of {', '.join(MATCH_BY)}")
    if match == "flops" and pruner is None and any(Budget.parse(b).ratio is None for b in budgets):
        raise TokensieveError("matching by flops needs each --budget as a share of the unpruned prefill FLOPs (0.3)")
    learned_at = centres or [None]  # the pruner's centres values; None: as trained
    matched_to = learned_at if match and pruner is not None else budgets  # what each method row is set by
    pairs = [(m, b) for m in methods for b in matched_to] if pairs is None else list(pairs)
    for name, budget in pairs:  # names, sites, budgets and parameters are checked before any model work
        if match:  # the budget comes from the match: the method must have one that can be planned
            matched_budget(backbone, name, site, 0.0, match, text_tokens=0)
        else:
            attach(backbone, name, budget, site=site, mode=mode).detach()
    for value in learned_at if pruner is not None else []:
        pruner.attach(backbone, mode, centres=value).detach()
    items = data.items
    text_tokens = median_text_tokens(backbone, items)
    scored = _Scorer(backbone, data, log, batch_size, progress, dist or Distributed())
    timed, examples = items[:timing_samples], items[:kept_examples]
    baseline = cost_fields(backbone, text_tokens)
    runs = ["none"]  # the scorer's run name of each row
    rows = [{"method": "none", "site": None, "budget": 1.0, "visual_tokens_kept": backbone.n_visual_tokens,
             **scored("none"), **baseline, "flops_ratio": 1.0, **timing_fields(backbone, timed, progress=progress)}]
    cases = pairs
    learned = [(pruner, c) for c in learned_at] if pruner is not None else []
    cases = learned + cases if match else cases + learned  # matched to the pruner: its rows first
    targets = {}  # budget -> the cost the methods are matched to
    for name, asked in tqdm(cases, desc="methods x budgets", unit="run", disable=not progress):
        budget, matched = asked, None
        if isinstance(name, (str, dict)):  # a method name, or a config {"name": ..., parameters}
            if match:
                target = targets[asked] if pruner is not None else _target(backbone, asked, match, baseline)
                budget, planned = matched_budget(backbone, name, site, target, match, text_tokens)
                matched = {"by": match, "to": _or_trained(asked), "target": round(target, 2),
                           "planned": round(planned, 2)}
            handle = attach(backbone, name, budget, site=site, mode=mode)
            name = name if isinstance(name, str) else name["name"]
        else:
            handle = name.attach(backbone, mode, centres=asked)
            name = "two_stage"
        stage = handle.stages[0]
        run = f"{name}@{stage.site}:{budget}"
        try:
            result = scored(run, handle=handle)
            _total_from_items(handle, scored.item_kept[run])
            counts = {str(st): _mean_count(handle, st) for st in handle.stages}  # before the examples' pass
            cost = cost_fields(backbone, text_tokens, handle)
            kept = _kept_tokens(backbone, handle, examples)
            timing = timing_fields(backbone, timed, progress=progress)
        finally:
            handle.detach()
        runs.append(run)
        rows.append({"method": name, "site": stage.site, "budget": _or_trained(budget),
                     "visual_tokens_kept": counts[str(stage)], "visual_tokens_per_stage": counts,
                     **result, **cost,
                     "flops_ratio": round(cost["flops"]["total"] / baseline["flops"]["total"], 4), **timing,
                     **kept, **({"matched": matched} if matched else {})})
        if name == "two_stage" and match:
            targets[asked] = cost["visual_tokens_mean_llm"] if match == "tokens" else cost["flops"]["total"]
    for budget in dict.fromkeys([*budgets, *(centres or [])]) if oracle else []:
        runs.append(f"object_oracle:{budget}")
        rows.append(_oracle_row(backbone, data, budget, text_tokens, baseline, scored, timed, examples))
    if examples:  # what each row answered on the pictured items, for the report's gallery
        for row, run in zip(rows, runs):
            row["examples"] = scored.examples(run, examples)
    item_scores = [scored.item_scores[run] for run in runs]
    _add_paired(rows, item_scores)
    _add_paired_at_cost(rows, item_scores)
    return rows


def _target(backbone: LlavaBackbone, budget: str, match: str, baseline: dict) -> float:
    """The cost a ``budget`` value asks for: visual tokens averaged over the LLM's layers (a count, or
    a share of the visual tokens), or prefill FLOPs (a share of the unpruned ``baseline``'s)."""
    if match == "tokens":
        return Budget.parse(budget).resolve(backbone.n_visual_tokens, "the visual tokens")
    return Budget.parse(budget).ratio * baseline["flops"]["total"]


def _or_trained(value):
    """A row's budget: the value asked for, or ``"trained"`` for the pruner as trained."""
    return value if value is not None else "trained"


def _pairing_budget(row: dict):
    """The budget a row is compared at: the one it was matched to, else its own."""
    return row.get("matched", {}).get("to", row["budget"])


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


def _total_from_items(handle: Handle, per_item: list[dict[str, int]]) -> None:
    """Make ``handle.kept_totals`` the tokens each stage kept summed over every item of the run,
    also those an earlier, interrupted process scored (read back from the log): token counts,
    FLOPs and KV-cache bytes then describe all items, as in an uninterrupted run."""
    handle.kept_totals = {str(st): (len(per_item), sum(kept[str(st)] for kept in per_item)) for st in handle.stages}


def _mean_count(handle: Handle, stage) -> int | float:
    """Visual tokens ``stage`` kept per item: an int, or a mean to 2 decimals when it kept a count per row."""
    mean = handle.mean_kept(str(stage))
    return int(mean) if mean.is_integer() else round(mean, 2)


def _add_paired(rows: list[dict], item_scores: list[list[float]]) -> None:
    """Give each ``two_stage`` row ``paired``: its :func:`paired_difference` against every other
    pruned row at the same budget (``against``: that row's method and site)."""
    for row, scores in zip(rows, item_scores):
        if row["method"] != "two_stage":
            continue
        row["paired"] = [{"against": f"{other['method']}@{other['site']}", "accuracy": other["accuracy"],
                          **paired_difference(scores, other_scores)}
                         for other, other_scores in zip(rows, item_scores)
                         if other["method"] not in ("none", "two_stage")
                         and _pairing_budget(other) == _pairing_budget(row)]


def _add_paired_at_cost(rows: list[dict], item_scores: list[list[float]]) -> None:
    """Give every other pruned row ``two_stage_at_cost`` when there are ``two_stage`` rows: the
    :func:`paired_difference` (the two-stage row's scores against this row's) of the most
    expensive two-stage row whose prefill FLOPs are no more than this row's, with that row's
    ``budget``, ``flops_ratio`` and ``accuracy``; None when every two-stage row costs more.
    Budgets count tokens at different places (entering the LLM, or after an LLM layer), so
    equal cost is the other fair comparison."""
    learned = [(row, scores) for row, scores in zip(rows, item_scores) if row["method"] == "two_stage"]
    if not learned:
        return
    for row, scores in zip(rows, item_scores):
        if row["method"] in ("none", "two_stage"):
            continue
        affordable = [(r, s) for r, s in learned if r["flops"]["total"] <= row["flops"]["total"]]
        if not affordable:
            row["two_stage_at_cost"] = None
            continue
        best, best_scores = max(affordable, key=lambda pair: pair[0]["flops"]["total"])
        row["two_stage_at_cost"] = {"budget": best["budget"], "flops_ratio": best["flops_ratio"],
                                    "accuracy": best["accuracy"], **paired_difference(best_scores, scores)}


class _Scorer:
    """Scores every item of ``data`` under a run name, through the log when there is one:
    items it holds are read back, the rest answered and appended batch by batch (an
    interruption loses at most one batch). With a handle, the tokens each stage kept for each
    item are logged and read back too (``item_kept``)."""

    def __init__(self, backbone: LlavaBackbone, data: EvalData, log: SampleLog | None, batch_size: int,
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


def _kept_tokens(backbone: LlavaBackbone, handle: Handle, items: list[VQAItem]) -> dict:
    """``{"kept_tokens": ...}`` (see :func:`compare_methods`) from one pass over ``items``; ``{}`` for none."""
    if not items:
        return {}
    handle.last_kept.clear()
    predict(backbone, items)
    return {"kept_tokens": {"ids": [i.question_id for i in items],
                            "stages": {stage: kept.tolist() for stage, kept in handle.last_kept.items()}}}


def _oracle_row(backbone: LlavaBackbone, data: EvalData, budget: str, text_tokens: int, baseline: dict,
                scored: _Scorer, timed: list[VQAItem], examples: list[VQAItem]) -> dict:
    """The object oracle's row: chosen between the projector and the LLM, like a projector-site method."""
    count = Budget.parse(budget).resolve(backbone.n_patches, "the object oracle")
    by_scene = object_oracle(count, scene_spec_for(backbone).grid)

    def choose(item: VQAItem):
        return by_scene(data.scenes[item.question_id])

    result = scored(f"object_oracle:{budget}", choose)
    kept = round(statistics.mean(len(choose(i)) for i in data.items))
    full = token_counts(backbone, text_tokens)
    counts = TokenCounts(full.vision_tokens, full.projector_tokens, [text_tokens + kept] * len(full.llm_tokens))
    cost = cost_fields(backbone, text_tokens, counts=counts)
    row = {"method": "object_oracle", "site": "projector", "budget": budget, "visual_tokens_kept": kept, **result,
           **cost, "flops_ratio": round(cost["flops"]["total"] / baseline["flops"]["total"], 4),
           **timing_fields(backbone, timed, kept=choose, progress=scored.progress)}
    if examples:
        row["kept_tokens"] = {"ids": [i.question_id for i in examples],
                              "stages": {f"object_oracle@projector:{budget}": [choose(i).tolist() for i in examples]}}
    return row
