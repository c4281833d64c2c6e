"""Adapter for transformers' Qwen-VL models: ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration`` (transformers 5.x).

This file is the only place that knows their module paths: vision tower ``model.model.visual``
(blocks ``.blocks``, 2x2 patch merger ``.merger``; Qwen3 also ``.deepstack_merger_list``), LLM
``model.model.language_model`` (layers ``.layers``), head ``model.lm_head``.

Supported inputs: images and videos, any number per prompt in any mix and any size (dynamic
resolution: an image or video with patch grid ``t x h x w`` gives ``t*h*w / 4`` visual tokens; a
video's ``t`` is its frames / 2), rows of a batch with different ones. Each image and each video is one
visual unit, numbered in prompt order over the batch (:mod:`.qwen_units`): ``kept=`` lists and the
``llm.0`` stage's choices are per unit, in that order.

Sites: ``projector`` and ``llm.0`` (the patch merger's output, per image or video: a merged token exists
only after the 2x2 merger, which is row-wise, so choosing there is choosing before it; ``projector`` is
where the tower methods act, with the last vision block's signals, :mod:`.qwen_tower`) and ``llm.k``
(before decoder layer ``k``, per row; Qwen3-VL's DeepStack additions then made by the session), in
``hard`` or ``soft`` mode; the session is :mod:`tokensieve.backbones.qwen_pruning`.
No ``vision.i``: the tower runs packed, window-permuted (Qwen2.5) and without a mask input
(docs/notes/qwen-vl-study.md, section 4).

The adapter runs the model as it runs itself - one tower pass over every image of the batch
(``get_image_features``), one over every video (``get_video_features``), M-RoPE ids from ``get_rope_index`` on the full prompt - but assembles
the LLM input itself, so fewer visual tokens than placeholders can enter the LLM: each unit's
placeholder runs shrink to the tokens kept, those keep their 3-D position ids, rows are re-padded
on the left, and the pruned features (Qwen3: every DeepStack level too, with the same indices)
go to the model as ``mm_encoder_outputs``, which does the scatter and the DeepStack additions.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.vision_utils import get_vision_window_index

from tokensieve.backbones.base import Site
from tokensieve.backbones.hf_checkpoint import checkpoint_config, load_complete, model_and_processor
from tokensieve.backbones.per_image_stage import embedded_question
from tokensieve.backbones.qwen_kept import checked_kept, kept_features, kept_per_run, row_origins
from tokensieve.backbones.qwen_layout import QwenInputs, QwenLayout, find_layout, shrunk_layout
from tokensieve.backbones.qwen_positions import (
    keep_columns,
    rope_positions,
    token_types,
)
from tokensieve.backbones.qwen_prompt import DEFAULT_SYSTEM, image_questions
from tokensieve.backbones.qwen_pruning import QwenPruningSession
from tokensieve.backbones.qwen_tower import TOWER_SIGNALS
from tokensieve.backbones.qwen_units import (
    checked_counts,
    encode_units,
    frame_runs,
    visual_units,
)
from tokensieve.backbones.row_llm import LLM_SIGNALS
from tokensieve.backbones.shipped import shipped_testbed
from tokensieve.devices import require_device
from tokensieve.errors import TokensieveError

MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                 "qwen3_vl": Qwen3VLForConditionalGeneration}


def load_qwen_weights(name: str, dtype: torch.dtype | None) -> nn.Module:
    """The Qwen-VL model of checkpoint ``name`` (a folder or a hub id), every weight from it."""
    family = checkpoint_config(name).model_type
    if family not in MODEL_CLASSES:
        raise TokensieveError(
            f"{name} is a {family!r} model; the Qwen-VL backbone needs model_type 'qwen2_vl', 'qwen2_5_vl' or "
            "'qwen3_vl' (Qwen2VL-, Qwen2_5_VL- or Qwen3VLForConditionalGeneration)")
    return load_complete(MODEL_CLASSES[family], name, dtype)


class QwenVLBackbone:
    """A Qwen-VL model (and its processor) seen through a token layout of several images per row."""

    family_name = "Qwen-VL"  # how messages shared with other backbones name this one

    def __init__(self, model: nn.Module, processor=None):
        if not isinstance(model, tuple(MODEL_CLASSES.values())):
            raise TokensieveError(f"expected a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model, got {type(model).__name__}")
        self.model = model
        self.processor = processor
        self.sessions: list[QwenPruningSession] = []  # attached pruning sessions (tokensieve.attach)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> QwenVLBackbone:
        """Load a hub id or a local folder holding a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint (None: the
        shipped Qwen2.5-VL testbed).

        Weights are read safely and completely (:mod:`tokensieve.backbones.hf_checkpoint`); the
        processor's image processor is the PIL one, the same with or without torchvision.
        """
        require_device(device)
        name = str(name_or_path or shipped_testbed("qwen"))
        model = load_qwen_weights(name, dtype)
        return cls(*model_and_processor(model, name, device, image_processor_apart=True))

    # --- module paths and geometry -------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> str:
        """``qwen2_vl``, ``qwen2_5_vl`` or ``qwen3_vl``."""
        return self.config.model_type

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    @property
    def system_prompt(self) -> str | None:
        """The system turn the family's chat template adds (for :func:`qwen_prompt.encode`)."""
        return DEFAULT_SYSTEM[self.family]

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    @property
    def llm_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def deepstack_levels(self) -> int:
        """Qwen3-VL: the decoder layers after which DeepStack features are added (layers 0..n-1); else 0."""
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())

    @property
    def merge_unit(self) -> int:
        """Patches behind one visual token (``spatial_merge_size**2``: 2x2)."""
        return self.config.vision_config.spatial_merge_size ** 2

    def most_image_tokens(self) -> int:
        """The most visual tokens one image can give: the processor's ``max_pixels`` over the pixels
        of one token (``(patch * merge)**2``); without a processor no bound is known (``sys.maxsize``)."""
        size = getattr(getattr(self.processor, "image_processor", None), "size", None) or {}
        vc = self.config.vision_config
        if "longest_edge" not in size:
            return sys.maxsize
        return size["longest_edge"] // (vc.patch_size * vc.spatial_merge_size) ** 2

    def merger_output_order(self, image_grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5: ``(sum_i N_i,)`` the order that takes the merger's rows (window order) to the
        tower's output order (what ``visual.forward`` does after the merger); other families: None."""
        if self.family != "qwen2_5_vl":
            return None
        vc = self.config.vision_config
        window_index, _ = get_vision_window_index(image_grid_thw, vc.spatial_merge_size, vc.window_size,
                                                  vc.patch_size)
        return torch.argsort(window_index)

    def image_token_counts(self, image_grid_thw: torch.Tensor) -> list[int]:
        """Visual tokens of each image (or video), ``t*h*w / merge**2`` of its ``(n, 3)`` grid row."""
        merge = self.config.vision_config.spatial_merge_size
        return (image_grid_thw.prod(-1) // merge ** 2).tolist()

    def layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               video_grid_thw: torch.Tensor | None = None) -> QwenLayout:
        """The placeholder runs, visual units and question tokens of each row of ``input_ids`` ``(B, L)``
        (``video_grid_thw`` groups a Qwen3-VL video's frame runs into one unit)."""
        return find_layout(input_ids, attention_mask, self.image_token_id, self.video_token_id,
                           frame_runs(video_grid_thw, self.family == "qwen3_vl"))

    # --- pruning ------------------------------------------------------------------------
    def sites(self) -> list[Site]:
        """``projector`` and ``llm.0`` (both the patch merger's output, the visual tokens as the LLM receives
        them) and ``llm.k`` before decoder layer ``k >= 1`` (Qwen3-VL too: its session then adds the
        DeepStack features)."""
        return [Site("projector")] + [Site("llm", k) for k in range(len(self.llm_layers))]

    def signals_at(self, site: Site) -> set[str]:
        """Before the LLM (``projector``, ``llm.0``): ``projector_input`` per visual token ``(N, 4 * d_v)``,
        the merger's input (its 2x2 patches side by side), and the last vision block's
        ``received_attention`` ``(N,)`` and ``keys`` ``(N, d_h)`` per visual token (:mod:`.qwen_tower`);
        at ``llm.k``: ``text_attention``, ``prev_layer_keys``, ``normed_states``, ``positions`` (1-D)
        and ``layer_text_attention``. No ``cls_attention``: the Qwen towers have no CLS token."""
        if site not in self.sites():
            return set()
        return {"projector_input", *TOWER_SIGNALS} if site.before_llm else set(LLM_SIGNALS)

    def install(self, handle, seed: int = 0) -> None:
        """Check ``handle``'s stages and register them (called by :func:`tokensieve.attach`)."""
        session = QwenPruningSession(self, handle, seed)
        if self.sessions:
            handle.detach()
            raise TokensieveError("a Qwen-VL backbone runs one attached handle at a time for now: detach the other "
                                  "one first")
        self.sessions.append(session)

    def _active_session(self) -> QwenPruningSession | None:
        return next((s for s in self.sessions if s.handle.active), None)

    # --- running the model --------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """One tower pass over every image: ``pixel_values`` ``(sum_i t_i*h_i*w_i, 3*2*14*14)``
        packed patches, ``image_grid_thw`` ``(n_images, 3)`` -> the model's output whose
        ``pooler_output`` is one ``(N_i, d_text)`` per image (Qwen3: and ``deepstack_features``)."""
        return self.model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, kept: Sequence[torch.Tensor] | None = None,
                mm_token_type_ids: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                answer_mask: torch.Tensor | None = None) -> QwenInputs:
        """Encode the images and videos and assemble the model input.

        input_ids, attention_mask: ``(B, L)`` prompts with full placeholder runs (padded on
        either side; the result is padded on the left).
        pixel_values, image_grid_thw / pixel_values_videos, video_grid_thw: the processor's packed
        patches and ``(n, 3)`` grids of the images / videos (either may be absent);
        second_per_grid_ts: ``(n_videos,)`` Qwen2.5-VL's seconds per temporal patch.
        kept: optional, per visual unit (images and videos in prompt order over the batch) a ``(M_u,)``
        increasing index tensor into its ``N_u`` visual tokens (a video's frame-major): only these enter
        the LLM, in unit order. With a handle attached its stage chooses them instead (and passing
        ``kept`` is refused).
        mm_token_type_ids: the processor's ``(B, L)`` token types (computed from ``input_ids``
        when absent).
        answer_mask: optional ``(B, L)`` positions of a teacher-forced sequence that methods reading the
        question must not see (the answers and every token after the first one).
        """
        layout = self.layout(input_ids, attention_mask, video_grid_thw)
        if answer_mask is not None:
            layout.question_mask &= ~answer_mask.bool()
        merge = self.config.vision_config.spatial_merge_size
        counts, grids = checked_counts(layout, image_grid_thw, video_grid_thw, merge)
        kept = None if kept is None else checked_kept(kept, counts, layout.kinds)
        session = self._active_session()
        if session is not None and kept is not None:
            raise TokensieveError("kept= and an attached pruning handle both choose the visual tokens: pass kept= "
                                  "after handle.detach() or inside handle.disabled()")
        if mm_token_type_ids is None:
            mm_token_type_ids = token_types(input_ids, self.image_token_id, self.video_token_id)
        positions = rope_positions(self.model.model, input_ids, attention_mask, image_grid_thw, mm_token_type_ids,
                                   video_grid_thw, second_per_grid_ts)
        features = encode_units(self.model.model, layout.kinds, pixel_values, image_grid_thw, pixel_values_videos,
                                video_grid_thw)
        units = visual_units(layout, grids, input_ids.device)
        values = None
        if session is not None and session.stage is not None and counts:
            questions = None if self.processor is None else (
                lambda: image_questions(self.processor.tokenizer, input_ids, layout))
            tower_grids = [g for g in (image_grid_thw, video_grid_thw) if g is not None]
            kept, values = session.choose(features.pooler_output, units, tower_grids, layout.kinds, questions,
                                          lambda unit: self._question_states(input_ids, layout, unit))
            if session.soft:  # every token stays; the session masks the dropped ones as keys
                features, kept = session.soft_features(features, kept, values), None
        stays = attention_mask.bool().clone()
        if kept is not None and counts:
            for b, row in enumerate(layout.runs):
                for run in row:
                    dropped = torch.ones(counts[run.unit], dtype=torch.bool, device=stays.device)
                    dropped[kept[run.unit]] = False
                    stays[b, run.start: run.start + run.count] &= ~dropped[run.offset: run.offset + run.count]
            features = kept_features(features, kept, values)
        after = shrunk_layout(layout, None if kept is None or not counts else kept_per_run(layout, kept))
        pad = self.config.text_config.pad_token_id
        shrunk = keep_columns(input_ids, positions, stays, after.lengths, 0 if pad is None else pad,
                              attention_mask.dtype)
        # Read by the model only when it builds positions itself (a later cached call without ids).
        self.model.model.rope_deltas = shrunk.rope_deltas
        if session is not None:
            exclude = None if answer_mask is None else keep_columns(  # the answers' columns, shrunk alike
                answer_mask.long(), positions, stays, after.lengths, 0, attention_mask.dtype).input_ids.bool()
            session.begin_llm_pass(after, row_origins(layout.units, counts, kept, input_ids.device), units, exclude)
            features = session.take_deepstack(features, layout.units)
        return QwenInputs(shrunk.input_ids, shrunk.attention_mask, shrunk.position_ids, features, layout.kinds)

    def _question_states(self, input_ids: torch.Tensor, layout, unit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states (1, T, d), valid (1, T))``: the input embeddings of the question of visual unit ``unit``'s row."""
        row = next(b for b, runs in enumerate(layout.runs) if any(run.unit == unit for run in runs))
        return embedded_question(self.model, input_ids[row][layout.question_mask[row]])

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, kept=None,
                mm_token_type_ids=None, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                answer_mask=None, **kwargs):
        """The model's output for the assembled sequence; logits ``(B, L', vocab)``, ``L' < L``
        when tokens were dropped. Without ``kept`` (and left-padded input) it is the plain model's."""
        inputs = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, kept, mm_token_type_ids,
                              pixel_values_videos, video_grid_thw, second_per_grid_ts, answer_mask)
        return self.model(**inputs.model_kwargs(), **kwargs)

    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, kept=None,
                 mm_token_type_ids=None, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                 **generate_kwargs) -> torch.Tensor:
        """New token ids ``(B, T_new)``; decoding uses the KV cache of the assembled prompt and
        continues the M-RoPE ids from the last prompt column (``max + 1`` of the full prompt)."""
        inputs = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, kept, mm_token_type_ids,
                              pixel_values_videos, video_grid_thw, second_per_grid_ts)
        out = self.model.generate(**inputs.model_kwargs(), **generate_kwargs)
        return out[:, inputs.input_ids.shape[1]:]
