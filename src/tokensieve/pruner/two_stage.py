"""The trained two-stage pruner as an inference object: load it, attach it, save it.

All parts live under one ``nn.Module`` (prefixes ``token_merger.``, ``layer_pruners.<layer>.``,
``discriminator.``) and are saved alone (safetensors + the resolved config); the backbone is
never saved with them and they load onto any copy of it:

    pruner = TwoStagePruner.from_pretrained("runs/two_stage_testbed", backbone)  # its best/ if there is one
    handle = pruner.attach(backbone, "hard", centres=0.25)
    pruner.save_pretrained("my_pruner")
"""

from __future__ import annotations

import json
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from tokensieve.attach import Handle, attach
from tokensieve.checkpoint import atomic_write
from tokensieve.config import from_dict, save_config, yaml_file
from tokensieve.errors import TokensieveError
from tokensieve.learned import HiddenStateDiscriminator, LayerPrunerHead, MergeResult, TokenMerger
from tokensieve.method import Budget
from tokensieve.methods.layer_pruner import LearnedLayerPruner
from tokensieve.methods.token_merger import LearnedTokenMerger
from tokensieve.pruner.placement import check_per_image_merger, placement
from tokensieve.pruner.settings import PrunerSettings, default_pruning_layers, stage_targets
from tokensieve.pruner.training_step import TrainingStep

PARTS_FILE = "parts.safetensors"
CONFIG_FILE = "config.yaml"


MERGE_RANGE_SEED = 20261124  # seeds the per-step merge-ratio draws (with the step number)


def backbone_signature(backbone) -> dict[str, int]:
    """The backbone facts the parts' shapes and sites depend on (checked when loading)."""
    return placement(backbone).signature


class TwoStagePruner(nn.Module):
    """Token merger, layer pruner heads and discriminator for one backbone and config.

    cfg: the pruner's settings; a training run passes its whole :class:`TwoStageConfig`
    (a :class:`PrunerSettings` with the training sections), which is what ``config.yaml`` holds.
    The merger acts where the backbone's :class:`~tokensieve.pruner.placement.Placement` says; where
    every image has its own token count (Qwen-VL) its centres (``n_centres``) and the heads' budgets
    are :class:`Budget` ratios of each image's (row's) tokens, elsewhere counts.
    """

    def __init__(self, cfg: PrunerSettings, backbone):
        super().__init__()
        self.place = placement(backbone)
        self.cfg, self.signature = cfg, self.place.signature
        n, d_vision, d_text = self.place.n_tokens, self.place.merger_width, self.signature["text_hidden"]
        m = cfg.merger
        self.n_centres: int | Budget | None = None
        if m.enabled and n is None:
            check_per_image_merger(m)
            self.n_centres = Budget(count=m.target_merge_tokens) if m.target_merge_tokens is not None else Budget(
                ratio=m.merge_ratio)
        elif m.enabled:
            self.n_centres = m.target_merge_tokens if m.target_merge_tokens is not None else max(1, round(m.merge_ratio * n))
            if not 1 <= self.n_centres <= n:
                raise TokensieveError(f"merger.target_merge_tokens {self.n_centres} is not between 1 and "
                                      f"the {n} visual tokens")
        self.token_merger = TokenMerger(d_vision, m.d_internal, m.variant,
                                        d_text if m.variant == "question_aware" else None, m.num_heads,
                                        m.null_logit) if m.enabled else None
        layers = self.pruning_layers(cfg, len(backbone.llm_layers))
        p = cfg.pruner
        self.layer_pruners = nn.ModuleDict({
            str(k): LayerPrunerHead(d_text, p.d_internal, p.num_heads, init_keep_bias=p.init_keep_bias) for k in layers})
        disc = cfg.discriminator
        n_states = len(backbone.llm_layers) + 1  # the embeddings and every layer's output
        bad = [k for k in disc.layers if not -n_states <= k < n_states]
        if disc.enabled and bad:
            raise TokensieveError(f"discriminator.layers {bad} do not exist: this LLM has {n_states} hidden "
                                  f"states (indices {-n_states} .. {n_states - 1})")
        self.discriminator = HiddenStateDiscriminator(d_text, len(disc.layers), disc.d_internal) if disc.enabled else None
        self._training: tuple[Handle, LearnedTokenMerger | None, list[LearnedLayerPruner]] | None = None
        self._step: TrainingStep | None = None  # set by set_step, filled by the training forward

    @staticmethod
    def pruning_layers(cfg: PrunerSettings, n_layers: int) -> list[int]:
        if not cfg.pruner.enabled:
            return []
        layers = cfg.pruner.pruning_layers or default_pruning_layers(n_layers)
        bad = [k for k in layers if not 1 <= k < n_layers]
        if bad:
            raise TokensieveError(f"pruner.pruning_layers {bad} are beyond this LLM: it has {n_layers} decoder "
                                  f"layers, so a head can act before layers 1 .. {n_layers - 1}")
        if len(set(layers)) != len(layers):
            raise TokensieveError(f"pruner.pruning_layers {layers} repeats a layer")
        return sorted(layers)

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.layer_pruners]

    def training_centres(self, step: int) -> int | Budget | None:
        """Centres at training ``step``: drawn from ``merger.train_merge_range`` when set (the same
        draw for the same step, so a resumed run replays it), else the configured count."""
        low_high = self.cfg.merger.train_merge_range
        if self.n_centres is None or low_high is None:
            return self.n_centres
        ratio = np.random.default_rng([MERGE_RANGE_SEED, step]).uniform(*low_high)
        return self._centres_at(ratio)

    def _centres_at(self, ratio: float) -> int | Budget:
        """``ratio`` of the merger's tokens: a count of the tokens every image has, or a ratio per image."""
        if self.place.n_tokens is None:
            return Budget(ratio=float(ratio))
        return max(1, round(ratio * self.place.n_tokens))

    def validation_centres(self) -> list[int | Budget | None]:
        """Merger budgets a validation scores (their mean picks ``best/``): both ends of
        ``merger.train_merge_range`` when set, since the parts are trained for every budget in
        it, else the configured count (None without a merger)."""
        low_high = self.cfg.merger.train_merge_range
        if self.n_centres is None or low_high is None:
            return [self.n_centres]
        return [self._centres_at(r) for r in low_high]

    def centres_for(self, centres: Budget | int | float | str | None) -> int | Budget | None:
        """The merger's centre count for ``centres``, the tokens entering the LLM: a count or a ratio of
        the patch tokens (None: as trained)."""
        if centres is None:
            return self.n_centres
        if self.token_merger is None:
            raise TokensieveError("this pruner has no token merger, so its budget is fixed by pruner.target_ratio; "
                                  "evaluate it without --centres")
        if self.place.n_tokens is None:
            return Budget.parse(centres)
        return Budget.parse(centres).resolve(self.place.n_tokens, "the token merger")

    def inference_counts(self, centres: int | Budget | None) -> list[int | Budget]:
        """Tokens each head keeps at inference: its share of the tokens entering the LLM (where each row
        has its own count, the ratio of the tokens the head sees that gives that share)."""
        targets = stage_targets(self.cfg.pruner.target_ratio, len(self.layers))
        if self.place.n_tokens is None:
            return [Budget(ratio=r / before) for r, before in zip(targets, [1.0, *targets])]
        total = (centres if centres is not None else self.place.n_tokens) + self.place.extra  # a kept CLS
        return [max(1, round(r * total)) for r in targets]

    def _methods(self, training: bool) -> tuple[LearnedTokenMerger | None, list[LearnedLayerPruner]]:
        """Registry methods wrapping these modules (they share the weights); in training they
        record their logits into the step of :meth:`set_step`."""
        m, p = self.cfg.merger, self.cfg.pruner
        merger = None if self.token_merger is None else LearnedTokenMerger(
            variant=m.variant, d_internal=m.d_internal, num_heads=m.num_heads, assign_tau=m.assign_tau,
            diversity=m.diversity, diversity_radius=m.diversity_radius, null_logit=m.null_logit, gate=m.gate,
            module=self.token_merger, record=self._record_merge if training else None)
        pruners = [LearnedLayerPruner(d_internal=p.d_internal, num_heads=p.num_heads, init_keep_bias=p.init_keep_bias,
                                      threshold=p.keep_threshold, module=self.layer_pruners[str(k)],
                                      record=partial(self._record_head, i) if training else None)
                   for i, k in enumerate(self.layers)]
        return merger, pruners

    def attach(self, backbone, mode: str = "hard", training: bool = False,
               centres: Budget | int | float | str | None = None) -> Handle:
        """Attach the parts: for training (soft mode, heads keep everything and mask by Gumbel
        samples; advance it with :meth:`set_step` before each forward) or for inference (heads
        keep their share by keep probability, or the tokens above ``pruner.keep_threshold``).

        centres: tokens entering the LLM (the merger's centres) at inference, a count or a ratio of the
        patch tokens; default as trained.
        The stages are the merger's at its placement's site (if any), then one per head at ``llm.<layer>``.
        """
        merger, pruners = self._methods(training)
        n_centres = self.centres_for(centres)
        stages = []
        if merger is not None:
            stages.append((merger, self.place.merger_site, n_centres))
        counts = self.inference_counts(n_centres)
        for k, method, count in zip(self.layers, pruners, counts):
            # With a keep threshold a head decides its own count (every token may stay).
            stages.append((method, f"llm.{k}", 1.0 if training or method.count_per_row else count))
        handle = attach(backbone, stages, mode=mode)
        if training:
            self._training, self._step = (handle, merger, pruners), None
        return handle

    # --- training -----------------------------------------------------------------------
    def set_step(self, step: int, tau: float) -> TrainingStep:
        """Advance the latest training attachment to training ``step``: the merger's centres
        (:meth:`training_centres`) and Gumbel temperature ``tau`` for the merger and every head.
        Returns the step's :class:`TrainingStep`, which the forward that follows fills with the
        logits the losses need."""
        if self._training is None:
            raise TokensieveError("set_step needs the pruner attached for training: attach(..., training=True)")
        handle, merger, pruners = self._training
        centres = self.training_centres(step)
        if merger is not None:
            merger.gumbel_tau = tau
            handle.stages[0].budget = centres if isinstance(centres, Budget) else Budget(count=centres)  # the merger's
        for method in pruners:
            method.tau = tau
        self._step = TrainingStep(step, tau, centres, stage_targets(self.cfg.pruner.target_ratio, len(pruners)),
                                  head_logits=[[] for _ in pruners])
        return self._step

    def _current_step(self) -> TrainingStep:
        if self._step is None:
            raise TokensieveError("a training forward of the pruner needs set_step(step, tau) first")
        return self._step

    def _record_merge(self, result: MergeResult) -> None:
        self._current_step().merges.append(result)

    def _record_head(self, index: int, logits: torch.Tensor) -> None:
        self._current_step().head_logits[index].append(logits)

    # --- saving -------------------------------------------------------------------------
    def inference_state(self) -> dict[str, torch.Tensor]:
        """Merger and heads only: what inference needs (the discriminator stays with the run)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("discriminator.")}

    def save_pretrained(self, folder: str | Path, metadata: dict[str, str] | None = None) -> None:
        """``parts.safetensors`` (fsynced) + ``config.yaml`` in ``folder``, each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, folder / CONFIG_FILE)
        meta = {"signature": json.dumps(self.signature), **(metadata or {})}
        state = {k: v.detach().contiguous() for k, v in self.inference_state().items()}
        atomic_write(folder / PARTS_FILE, lambda tmp: save_file(state, tmp, metadata=meta))

    @classmethod
    def from_pretrained(cls, folder: str | Path, backbone) -> TwoStagePruner:
        """The pruner saved in ``folder`` (a run folder: its ``best/`` if there is one) onto
        ``backbone``, in eval mode. Only the pruner's sections of ``config.yaml`` are read."""
        folder = Path(folder)
        if (folder / "best" / PARTS_FILE).is_file():
            folder = folder / "best"
        weights, config = folder / PARTS_FILE, folder / CONFIG_FILE
        if not weights.is_file() or not config.is_file():
            raise TokensieveError(f"{folder} is not a trained pruner: it needs {PARTS_FILE} and {CONFIG_FILE}")
        pruner = cls(read_settings(config), backbone)
        try:
            with safe_open(weights, "pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                saved_signature = json.loads((f.metadata() or {}).get("signature", "{}"))
        except (SafetensorError, OSError, ValueError) as err:
            raise TokensieveError(f"cannot read {weights}: {err}") from None
        if saved_signature and saved_signature != pruner.signature:
            raise TokensieveError(f"{weights} was trained on a different backbone ({saved_signature}); "
                                  f"this one is {pruner.signature}")
        missing, unexpected = pruner.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("discriminator.")]
        if missing or unexpected:
            raise TokensieveError(f"{weights} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return pruner.eval()


def read_settings(path: Path) -> PrunerSettings:
    """The pruner's sections of a ``config.yaml`` (a training run's file also holds its training
    sections, which inference does not read)."""
    data = yaml_file(path, "config file") or {}
    if not isinstance(data, dict):
        raise TokensieveError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(PrunerSettings)]
    try:
        return from_dict(PrunerSettings, {k: v for k, v in data.items() if k in names})
    except TokensieveError as err:
        raise TokensieveError(f"{path}: {err}") from err
