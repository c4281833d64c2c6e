"""Accuracy of a LLaVA, Qwen-VL, LLaVA-NeXT or LLaVA-OneVision model with reduction methods attached, next to
the unpruned model."""

from __future__ import annotations

from functools import partial

from tqdm import tqdm

from tokensieve.attach import Handle, attach
from tokensieve.backbones.load import is_anyres, is_qwen
from tokensieve.data.vqa_files import VQAItem
from tokensieve.distributed import Distributed
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.anyres_costs import AnyresCosts
from tokensieve.evaluate.costs import LlavaCosts
from tokensieve.evaluate.eval_data import EvalData
from tokensieve.evaluate.latency import measure_latency
from tokensieve.evaluate.matching import MATCH_BY, matched_budget
from tokensieve.evaluate.oracle import check_oracle_budgets, oracle_row
from tokensieve.evaluate.paired import add_paired, add_paired_at_cost
from tokensieve.evaluate.predict import predict
from tokensieve.evaluate.qwen_costs import QwenCosts
from tokensieve.evaluate.qwen_matching import QwenPlan
from tokensieve.evaluate.sample_log import SampleLog
from tokensieve.evaluate.scorer import Scorer
from tokensieve.method import Budget
from tokensieve.methods import method_label


def timing_fields(backbone, samples: list[VQAItem], kept=None, progress: bool = False) -> dict:
    """Measured latency on ``samples`` (none: every field None, the timing was not asked for)."""
    if not samples:
        return {"ttft_ms": None, "ttft_ms_iqr": None, "decode_ms_per_token": None, "decode_ms_per_token_iqr": None,
                "peak_memory_mb": None}
    return measure_latency(backbone, samples, kept=kept, progress=progress)


def compare_methods(backbone, data: EvalData, methods: list[str | dict], budgets: list[str],
                    mode: str = "hard", site: str | None = None, batch_size: int = 64, progress: bool = True,
                    pruner=None, centres: list[str] | None = None, oracle: bool = False, log: SampleLog | None = None, timing_samples: int = 8,
                    kept_examples: int = 0, dist: Distributed | None = None, match: str | None = None,
                    pairs: list[tuple[str, str]] | None = None, split: str = "all") -> list[dict]:
    """Rows ``{method, site, budget, visual_tokens_kept, accuracy, per_family, flops, flops_ratio,
    tokens_per_llm_layer}``; the first row is the unpruned model (``method`` ``"none"``),
    measured on the same items of ``data``. FLOPs are for one prefill of the median prompt (on
    Qwen-VL, LLaVA-NeXT and LLaVA-OneVision, whose images differ in visual tokens, the token counts, FLOPs
    and KV cache are means over the items of each one's prefill: :mod:`.qwen_costs`, :mod:`.anyres_costs`).
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
    methods: names, or configs ``{"name": ..., parameter: value}`` (a row is labelled by
    :func:`tokensieve.methods.method_label`).
    pairs: the ``(method, budget)`` rows to measure, instead of every method at every budget.
    split: how each method's budget is split over an anyres image's base and crops (``attach``'s ``split``).
    """
    if oracle and data.scenes is None:
        raise TokensieveError("--oracle needs the synthetic set: the object oracle knows where its objects are")
    if match is not None and match not in MATCH_BY:
        raise TokensieveError(f"cannot match by {match!r}; expected one of {', '.join(MATCH_BY)}")
    if (match or oracle) and is_anyres(backbone):
        raise TokensieveError(f"--{'match' if match else 'oracle'} on {backbone.family_name}: budgets are not planned "
                              "per image of base and crops yet; give plain --budget values")
    if match == "flops" and pruner is None and any(Budget.parse(b).ratio is None for b in budgets):
        raise TokensieveError("matching by flops needs each --budget as a share of the unpruned prefill FLOPs (0.3)")
    learned_at = centres or [None]  # the pruner's centres values; None: as trained
    matched_to = learned_at if match and pruner is not None else budgets  # what each method row is set by
    pairs = [(m, b) for m in methods for b in matched_to] if pairs is None else list(pairs)
    items = data.items
    costs = plan = None
    if match and is_qwen(backbone):  # budgets are planned on each item's image (no model work)
        costs = QwenCosts(backbone, items)
        plan = QwenPlan(backbone, costs, costs.of_run())

    def matched_for(name, target: float, text_tokens: int) -> tuple[int | float, float]:
        if plan is not None:
            return plan.matched_budget(name, site, target, match)
        return matched_budget(backbone, name, site, target, match, text_tokens)

    for name, budget in pairs:  # names, sites, budgets and parameters are checked before any model work
        if match:  # the budget comes from the match: the method must have one that can be planned
            matched_for(name, 0.0, 0)
        else:
            attach(backbone, name, budget, site=site, mode=mode, split=split).detach()
    for value in learned_at if pruner is not None else []:
        pruner.attach(backbone, mode, centres=value).detach()
    oracle_budgets = list(dict.fromkeys([*budgets, *(centres or [])])) if oracle else []
    check_oracle_budgets(backbone, data, oracle_budgets)
    costs = costs or _costs(backbone, items)
    text_tokens = costs.text_tokens
    scored = Scorer(backbone, data, log, batch_size, progress, dist or Distributed())
    timed, examples = items[:timing_samples], items[:kept_examples]
    baseline = costs.of_run()
    runs = ["none"]  # the scorer's run name of each row
    rows = [{"method": "none", "site": None, "budget": 1.0, "visual_tokens_kept": costs.visual_tokens,
             **scored("none"), **baseline, "flops_ratio": 1.0, **timing_fields(backbone, timed, progress=progress)}]
    cases = pairs
    learned = [(pruner, c) for c in learned_at] if pruner is not None else []
    cases = learned + cases if match else cases + learned  # matched to the pruner: its rows first
    targets = {}  # budget -> the cost the methods are matched to
    for name, asked in tqdm(cases, desc="methods x budgets", unit="run", disable=not progress):
        budget, matched = asked, None
        if isinstance(name, (str, dict)):  # a method name, or a config {"name": ..., parameters}
            if match:
                target = targets[asked] if pruner is not None else _target(costs, asked, match, baseline)
                budget, planned = matched_for(name, target, text_tokens)
                matched = {"by": match, "to": _or_trained(asked), "target": round(target, 2),
                           "planned": round(planned, 2)}
            handle = attach(backbone, name, budget, site=site, mode=mode, split=split)
            name = method_label(name)
        else:
            handle = name.attach(backbone, mode, centres=asked)
            name = "two_stage"
        stage = handle.stages[0]
        run = f"{name}@{stage.site}:{budget}"
        try:
            result = scored(run, handle=handle)
            _total_from_items(handle, scored.item_kept[run])
            counts = {str(st): _mean_count(handle, st) for st in handle.stages}  # before the examples' pass
            cost = costs.of_run(handle, scored.item_kept[run])
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
    for budget in oracle_budgets:
        runs.append(f"object_oracle:{budget}")
        rows.append(oracle_row(backbone, data, budget, costs, baseline, scored,
                               partial(timing_fields, backbone, timed, progress=progress), examples))
    if examples:  # what each row answered on the pictured items, for the report's gallery
        for row, run in zip(rows, runs):
            row["examples"] = scored.examples(run, examples)
    item_scores = [scored.item_scores[run] for run in runs]
    add_paired(rows, item_scores)
    add_paired_at_cost(rows, item_scores)
    return rows


def _costs(backbone, items: list[VQAItem]) -> LlavaCosts | QwenCosts | AnyresCosts:
    """The cost fields' source: per item where each image gives its own visual tokens, else the median prompt."""
    if is_qwen(backbone):
        return QwenCosts(backbone, items)
    return AnyresCosts(backbone, items) if is_anyres(backbone) else LlavaCosts(backbone, items)


def _target(costs, budget: str, match: str, baseline: dict) -> float:
    """The cost a ``budget`` value asks for: visual tokens averaged over the LLM's layers (a count, or
    a share of the unpruned visual tokens, on Qwen-VL their mean), or prefill FLOPs (a share of the
    unpruned ``baseline``'s)."""
    if match == "tokens":
        return Budget.parse(budget).resolve(costs.visual_tokens, "the visual tokens")
    return Budget.parse(budget).ratio * baseline["flops"]["total"]


def _or_trained(value):
    """A row's budget: the value asked for, or ``"trained"`` for the pruner as trained."""
    return value if value is not None else "trained"


def _total_from_items(handle: Handle, per_item: list[dict[str, int]]) -> None:
    """Make ``handle.kept_totals`` the tokens each stage kept summed over every item of the run,
    also those an earlier, interrupted process scored (read back from the log): token counts,
    FLOPs and KV-cache bytes then describe all items, as in an uninterrupted run."""
    handle.kept_totals = {str(st): (len(per_item), sum(kept[str(st)] for kept in per_item)) for st in handle.stages}


def _mean_count(handle: Handle, stage) -> int | float:
    """Visual tokens ``stage`` kept per item: an int, or a mean to 2 decimals when it kept a count per row."""
    mean = handle.mean_kept(str(stage))
    return int(mean) if mean.is_integer() else round(mean, 2)


def _kept_tokens(backbone, handle: Handle, items: list[VQAItem]) -> dict:
    """``{"kept_tokens": ...}`` (see :func:`compare_methods`) from one pass over ``items``; ``{}`` for none."""
    if not items:
        return {}
    handle.last_kept.clear()
    predict(backbone, items)
    return {"kept_tokens": {"ids": [i.question_id for i in items],
                            "stages": {stage: kept.tolist() for stage, kept in handle.last_kept.items()}}}
