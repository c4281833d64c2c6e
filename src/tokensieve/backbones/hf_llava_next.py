"""Adapter for transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6, anyres).

This file is the only place that knows its module paths (transformers 5.x): vision tower
``model.model.vision_tower``, projector ``model.model.multi_modal_projector``, newline vector
``model.model.image_newline``, LLM ``model.model.language_model`` (layers ``.layers``), head ``model.lm_head``.

Supported inputs: one image per prompt (v1), any size; rows of a batch may hold images of different
sizes and aspect ratios, so their visual runs differ in length. Image ``i`` is cut into a base crop and
``n_h x n_w`` high-resolution crops, and the model packs their features into one run of ``N_i`` tokens:
the base grid, then the unpadded canvas of the crops with one newline token after every canvas row
(:mod:`tokensieve.backbones.anyres_layout` gives each token's part, row, column and source).

The adapter runs the model as it runs itself - one tower pass over every crop of the batch and the
model's own packing (``get_image_features``) - but assembles the LLM input itself
(:func:`~tokensieve.backbones.llava_assembly.assemble_rows`), so fewer visual tokens than placeholders
can enter the LLM. Sites (the session is :mod:`tokensieve.backbones.anyres_pruning`, hard or soft mode):

* ``llm.0``: the packed run of each image, chosen per image (a ratio: that share of the image's
  tokens; a count: that many of every image);
* ``llm.k`` (``k >= 1``): before decoder layer ``k``, per row, among its visual tokens (1-D RoPE,
  positions kept, or renumbered by a method that renumbers them; tokens a method makes after the row's
  last newline).

Newline tokens follow the policy ``keep``: they are outside the budget and never candidates, at every
site; a method sees only the base and crop tokens, and every newline enters the LLM. No ``vision.i``
or ``projector`` site: the tower's batch is crops, not prompts, and the model's packing views every
crop as its full grid, so tokens cannot be dropped before it (docs/notes/llava-next-study.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration

from tokensieve.backbones.anyres_layout import AnyresLayout, anyres_layout
from tokensieve.backbones.anyres_pruning import LLM0, AnyresPruningSession
from tokensieve.backbones.anyres_split import SPLITS
from tokensieve.backbones.anyres_tower import CROP_SIGNALS
from tokensieve.backbones.base import Site
from tokensieve.backbones.hf_checkpoint import checkpoint_config, load_complete, model_and_processor
from tokensieve.backbones.llava_assembly import AssembledInputs, RowImage, assemble_rows
from tokensieve.backbones.qwen_kept import checked_kept, kept_per_run
from tokensieve.backbones.qwen_layout import QwenLayout, find_layout, shrunk_layout
from tokensieve.backbones.qwen_units import in_unit_order
from tokensieve.backbones.row_llm import LLM_SIGNALS
from tokensieve.devices import require_device
from tokensieve.errors import TokensieveError

# The assistant's cue ending a prompt, special tokens left out: LLaVA-1.5's and Vicuna's "ASSISTANT:", Mistral's
# "[/INST]", ChatML's "assistant" (the chat templates of llava-hf's v1.6 checkpoints, :mod:`.chat_format`).
ANSWER_CUE = re.compile(r"\s*(ASSISTANT\s*:|\[/INST\]|assistant)\s*$", re.IGNORECASE)


class LlavaNextBackbone:
    """A LLaVA-NeXT model (and its processor) seen through per-image anyres layouts. The OneVision adapter
    (:mod:`.hf_llava_onevision`) is this one with its own model class, layouts and inputs."""

    family_name = "LLaVA-NeXT"  # how messages shared with other backbones name this one
    model_type = "llava_next"  # the config's model_type this adapter loads
    model_class = LlavaNextForConditionalGeneration
    units_word = "image"  # what one prompt holds, in messages
    tower_has_cls = True  # CLIP: per-crop CLS attention exists
    takes_video = False  # prompts hold images only
    visual_inputs: tuple[str, ...] = ()  # processor outputs beyond images that forward/generate hand to encode_units
    answer_cue = ANSWER_CUE  # the assistant's cue ending a prompt's text (left out of a question)
    image_processor_apart = False  # model_and_processor's option: the processor also holds a video processor
    splits = SPLITS  # how attach's split= may divide an image's llm.0 budget over its base and crops

    def __init__(self, model: LlavaNextForConditionalGeneration, processor=None):
        if not isinstance(model, self.model_class):
            raise TokensieveError(f"expected a {self.model_class.__name__}, got {type(model).__name__}")
        self.model = model
        self.processor = processor
        self.sessions: list[AnyresPruningSession] = []  # attached pruning sessions (tokensieve.attach)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> LlavaNextBackbone:
        """Load a hub id or a local folder holding a LLaVA-NeXT checkpoint.

        Weights are read safely and completely (:mod:`tokensieve.backbones.hf_checkpoint`); the
        processor's image processor is the PIL one, the same with or without torchvision.
        """
        require_device(device)
        name = str(name_or_path)
        config = checkpoint_config(name)
        if config.model_type != cls.model_type:
            raise TokensieveError(f"{name} is a {config.model_type!r} model; the {cls.family_name} backbone needs "
                                  f"model_type '{cls.model_type}' ({cls.model_class.__name__})")
        model = load_complete(cls.model_class, name, dtype)
        return cls(*model_and_processor(model, name, device, image_processor_apart=cls.image_processor_apart))

    # --- module paths and geometry -------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.model.model.vision_tower.encoder.layers

    @property
    def feature_block(self) -> int:
        """The tower block whose output is the feature layer (``vision_feature_layer``; -2: the penultimate
        block, 22 of CLIP-L's 24)."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise TokensieveError(f"vision_feature_layer {layer!r}: per-crop tower signals need one feature layer")
        block = layer % (len(self.vision_layers) + 1) - 1
        if block < 0:
            raise TokensieveError(f"vision_feature_layer {layer} is the tower's embeddings, the output of no block")
        return block

    @property
    def llm_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def video_token_id(self) -> int | None:
        """The video placeholder's id (None: the family takes no video)."""
        return int(self.config.video_token_id) if self.takes_video else None

    @property
    def crop_grid(self) -> int:
        """Patches per side of one crop (the tower's ``image_size // patch_size``)."""
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def image_layout(self, image_size) -> AnyresLayout:
        """The packed run of an image of ``image_size`` ``(height, width)``."""
        return anyres_layout(image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size,
                             self.crop_grid)

    def most_image_tokens(self) -> int:
        """The most candidate tokens (base + crops, newlines left out) one image can give: the base grid
        and the largest canvas of ``image_grid_pinpoints``, which an image of that size fills uncut."""
        crop, grid = self.config.vision_config.image_size, self.crop_grid
        return grid * grid + max((h // crop) * (w // crop) for h, w in self.config.image_grid_pinpoints) * grid * grid

    def layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> QwenLayout:
        """The image (and video) runs and question tokens of each row of ``input_ids`` ``(B, L)``."""
        return find_layout(input_ids, attention_mask, self.image_token_id, self.video_token_id)

    # --- pruning ------------------------------------------------------------------------
    def sites(self) -> list[Site]:
        """``llm.0`` (the packed run of each image) and ``llm.k`` before decoder layer ``k >= 1``."""
        return [Site("llm", k) for k in range(len(self.llm_layers))]

    def signals_at(self, site: Site) -> set[str]:
        """At ``llm.0``: ``projector_input`` (per token ``(N, d_v)``, the tower feature behind it), the
        per-crop CLS attention rows :data:`~tokensieve.backbones.anyres_tower.CROP_SIGNALS` ``(1, n_crops, P)``
        and ``anyres_source`` ``(1, N)`` (each token's crop patch); at ``llm.k``: ``text_attention``,
        ``prev_layer_keys``, ``normed_states``, ``positions`` and ``layer_text_attention``."""
        if site not in self.sites():
            return set()
        return {"projector_input", "anyres_source", *CROP_SIGNALS} if site == LLM0 else set(LLM_SIGNALS)

    def install(self, handle, seed: int = 0) -> None:
        """Check ``handle``'s stages and register them (called by :func:`tokensieve.attach`)."""
        session = AnyresPruningSession(self, handle, seed)
        if self.sessions:
            handle.detach()
            raise TokensieveError(f"a {self.family_name} backbone runs one attached handle at a time for now: "
                                  "detach the other one first")
        self.sessions.append(session)

    def _active_session(self) -> AnyresPruningSession | None:
        return next((s for s in self.sessions if s.handle.active), None)

    # --- running the model --------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor
                      ) -> tuple[list[torch.Tensor], list[AnyresLayout]]:
        """One tower pass over every crop and the model's own packing: ``pixel_values``
        ``(n_images, max_crops, 3, S, S)``, ``image_sizes`` ``(n_images, 2)`` -> per image its packed
        run ``(N_i, d_text)`` and its layout."""
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True)
        return list(out.pooler_output), [self.image_layout(size) for size in image_sizes.tolist()]

    def encode_videos(self, pixel_values_videos: torch.Tensor) -> tuple[list[torch.Tensor], list]:
        """One tower pass over every frame and the model's own pooling: ``pixel_values_videos``
        ``(n_videos, F, 3, S, S)`` -> per video its run ``(N_v, d_text)`` and its layout (:meth:`video_layout`,
        which a family taking videos gives)."""
        out = self.model.model.get_video_features(pixel_values_videos, return_dict=True)
        return list(out.pooler_output), [self.video_layout(pixel_values_videos.shape[1])] * len(pixel_values_videos)

    def encode_units(self, kinds: list[str], pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None,
                     pixel_values_videos: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list]:
        """Per visual unit (``kinds``: prompt order over the batch, one per row) its run ``(N_u, d_text)``
        and layout: one tower pass over the images' crops (:meth:`encode_images`), then one over the videos'
        frames (:meth:`encode_videos`), as the model runs them. A family with further inputs
        (:attr:`visual_inputs`) takes them here as keywords."""
        self._check_given(kinds, "image", image_sizes)
        self._check_given(kinds, "video", pixel_values_videos)
        features, layouts = {}, {}
        if "image" in kinds:
            features["image"], layouts["image"] = self.encode_images(pixel_values, image_sizes)
        if "video" in kinds:
            features["video"], layouts["video"] = self.encode_videos(pixel_values_videos)
        return in_unit_order(features, kinds), in_unit_order(layouts, kinds)

    @staticmethod
    def _check_given(kinds: list[str], kind: str, given: torch.Tensor | None) -> None:
        """One line unless the prompts hold one run of ``kind`` per row of ``given`` (None: none given)."""
        have, count = kinds.count(kind), 0 if given is None else len(given)
        if have != count:
            raise TokensieveError(f"{count} {kind}s given for {have} prompts with a <{kind}> run: one {kind} per prompt")

    def _checked_rows(self, layout: QwenLayout) -> None:
        """Each row holds one image (or video) run."""
        for b, row in enumerate(layout.runs):
            if len(row) != 1:
                raise TokensieveError(f"the {self.family_name} backbone takes one {self.units_word} per prompt for "
                                      f"now: row {b} has {len(row)} runs of placeholder tokens")

    def _checked_runs(self, layout: QwenLayout, layouts: list) -> list[int]:
        """Each row's run as long as its unit's packed run; returns the lengths."""
        for b, (row, unit) in enumerate(zip(layout.runs, layouts)):
            if row[0].count != len(unit):
                given = "its image_sizes entry" if unit.kind == "image" else "its frames"
                raise TokensieveError(f"row {b} has {row[0].count} <{unit.kind}> tokens for an {unit.kind} of "
                                      f"{len(unit)} tokens ({given})")
        return [len(unit) for unit in layouts]

    def _questions(self, input_ids: torch.Tensor, layout: QwenLayout) -> list[str]:
        """Each row's question as text, without special tokens and the answer cue (:attr:`answer_cue`)."""
        tokenizer = self.processor.tokenizer
        return [self.answer_cue.sub("", tokenizer.decode(ids[mask], skip_special_tokens=True)).strip()
                for ids, mask in zip(input_ids, layout.question_mask)]

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_sizes: torch.Tensor | None = None, kept: Sequence[torch.Tensor] | None = None,
                **visual) -> AssembledInputs:
        """Encode the images (and videos) and assemble the LLM input.

        input_ids, attention_mask: ``(B, L)`` prompts with full placeholder runs (padded on either
        side; the result is padded on the left). kept: optional, per image a ``(M_i,)`` increasing index
        tensor into its packed run of ``N_i`` tokens (newlines included: give theirs to keep them): only
        these enter the LLM, in order. With a handle attached its stages choose instead (and passing
        ``kept`` is refused). visual: the family's further inputs (:attr:`visual_inputs`).
        """
        layout = self.layout(input_ids, attention_mask)
        session = self._active_session()
        if session is not None and kept is not None:
            raise TokensieveError("kept= and an attached pruning handle both choose the visual tokens: pass kept= "
                                  "after handle.detach() or inside handle.disabled()")
        self._checked_rows(layout)
        features, layouts = self.encode_units(layout.kinds, pixel_values, image_sizes, **visual)
        counts = self._checked_runs(layout, layouts)
        kept = None if kept is None else checked_kept(kept, counts, layout.kinds)
        if session is not None and session.stage is not None:
            questions = None if self.processor is None else (lambda: self._questions(input_ids, layout))
            kept = session.choose(features, layouts, (input_ids, layout.question_mask), questions)
            if session.soft:  # every token stays; the others get attention mask 0 (positions skip them)
                session.soft_alive = [torch.zeros(n, dtype=torch.bool, device=k.device).index_fill(0, k, True)
                                      for n, k in zip(counts, kept)]
                kept = None
        if kept is not None:
            features = [f[k.to(f.device)] for f, k in zip(features, kept)]
        images = [RowImage(layout.real_before(b, row[0].start), count, input_ids.shape[1] - length)
                  for b, (row, count, length) in enumerate(zip(layout.runs, counts, layout.lengths))]
        alive = None if session is None or session.soft_alive is None else torch.cat(session.soft_alive)
        inputs = assemble_rows(self.model.get_input_embeddings(), input_ids, attention_mask, images, features,
                               self.image_token_id, self.config.text_config.pad_token_id, alive)
        if session is not None:
            runs = [torch.arange(n, device=input_ids.device) for n in counts] if kept is None else \
                [k.to(input_ids.device) for k in kept]
            # the assembled rows' layout, from the prompts' (soft mode: every token stays in its run)
            after = shrunk_layout(layout, None if kept is None else kept_per_run(layout, kept))
            session.begin_llm_pass(after, runs, layouts)
        return inputs

    def _split_visual(self, kwargs: dict) -> dict:
        """The family's further visual inputs (:attr:`visual_inputs`), taken out of ``kwargs``."""
        return {name: kwargs.pop(name) for name in self.visual_inputs if name in kwargs}

    def forward(self, input_ids, attention_mask, pixel_values=None, image_sizes=None, kept=None, **kwargs):
        """The model's output for the assembled sequence; logits ``(B, L', vocab)``, ``L' < L`` when
        tokens were dropped. Without ``kept`` it is the plain model's at positions ``cumsum(mask) - 1``."""
        visual = self._split_visual(kwargs)
        inputs = self.prepare(input_ids, attention_mask, pixel_values, image_sizes, kept, **visual)
        return self.model(**inputs.model_kwargs(), **kwargs)

    def generate(self, input_ids, attention_mask, pixel_values=None, image_sizes=None, kept=None, **generate_kwargs):
        """New token ids ``(B, T_new)``; decoding uses the KV cache of the assembled prompt."""
        visual = self._split_visual(generate_kwargs)
        inputs = self.prepare(input_ids, attention_mask, pixel_values, image_sizes, kept, **visual)
        return self.model.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                   **generate_kwargs)
