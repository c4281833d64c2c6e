"""Adapter for transformers' ``LlavaForConditionalGeneration``.

This file is the only place that knows LLaVA's module paths (NOTES.md, transformers 5.x):
vision tower ``model.model.vision_tower`` (layers at ``.encoder.layers``), projector
``model.model.multi_modal_projector``, LLM ``model.model.language_model``, head ``model.lm_head``.

The adapter runs the model the way LLaVA does — one vision-tower pass through
``get_image_features`` (honouring ``vision_feature_layer`` and
``vision_feature_select_strategy``), features scattered into the ``<image>`` placeholders —
but assembles the sequence itself, so fewer visual tokens than placeholders can enter the
LLM: the placeholder run of each row is shrunk to the tokens kept and rows are re-padded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from tokensieve.backbones.attention_signals import layer_cls_attention
from tokensieve.backbones.base import Site
from tokensieve.backbones.hf_checkpoint import model_and_processor
from tokensieve.backbones.kept_indices import checked_indices
from tokensieve.backbones.llava_assembly import AssembledInputs, RowImage, assemble_rows, left_padded
from tokensieve.backbones.llava_checkpoint import load_llava_weights
from tokensieve.backbones.llava_pruning import LlavaPruningSession
from tokensieve.backbones.llava_signals import llava_signals_at
from tokensieve.backbones.shipped import shipped_testbed
from tokensieve.devices import require_device
from tokensieve.errors import TokensieveError


@dataclass
class TokenLayout:
    """Where things sit in a (left-padded) batch of prompts.

    image_start, image_count: ``(B,)`` first position and length of each row's image run.
    question_mask: ``(B, L)`` True on real tokens after the image run (question + answer cue).
    images: per row where its image run lies, on the host.
    """

    image_start: torch.Tensor
    image_count: torch.Tensor
    question_mask: torch.Tensor
    images: list[RowImage]


class LlavaBackbone:
    """A LLaVA model (and its processor) seen through named sites and a token layout."""

    def __init__(self, model: LlavaForConditionalGeneration, processor: LlavaProcessor | None = None):
        if not isinstance(model, LlavaForConditionalGeneration):
            raise TokensieveError(f"expected a LlavaForConditionalGeneration, got {type(model).__name__}")
        self.model = model
        self.processor = processor
        self._sessions: list = []  # attached pruning sessions (tokensieve.attach)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> LlavaBackbone:
        """Load a hub id or a local folder (default: the shipped testbed).

        Weights are read as safetensors, or ``.bin`` files by ``torch.load(weights_only=True)``
        (transformers' own choice), so a checkpoint cannot run code; one that lacks any of the
        model's weights is refused rather than completed with random ones.
        """
        require_device(device)
        name = str(name_or_path or shipped_testbed())
        model = load_llava_weights(name, dtype)
        return cls(*model_and_processor(model, name, device))

    # --- module paths -------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layers

    @property
    def llm_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    # --- geometry -----------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def feature_hidden_index(self) -> int:
        """Index into the tower's ``hidden_states`` that LLaVA feeds the projector."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise TokensieveError(f"multi-layer vision_feature_layer {layer} is not supported")
        return layer % (len(self.vision_layers) + 1)

    @property
    def keeps_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "full"

    @property
    def patch_grid(self) -> int:
        """Patches per side of the (square) image: patch ``p`` is at row ``p // grid``, column ``p % grid``."""
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def n_patches(self) -> int:
        return self.patch_grid ** 2

    @property
    def n_visual_tokens(self) -> int:
        """Visual tokens per image that enter the LLM when nothing is removed."""
        return self.n_patches + int(self.keeps_cls)

    def sites(self) -> list[Site]:
        """Every site where removing tokens changes the result.

        Vision blocks after the feature layer never reach the LLM, so they are not sites.
        """
        vision = [Site("vision", i) for i in range(1, self.feature_hidden_index)]
        llm = [Site("llm", k) for k in range(len(self.llm_layers))]
        return vision + [Site("projector")] + llm

    def signals_at(self, site: Site) -> set[str]:
        """The signals a method can read at ``site`` (docs/methods.md has the table)."""
        return llava_signals_at(self, site)

    def site_module(self, site: Site) -> nn.Module:
        """The module whose forward pre-hook sees the tokens at ``site`` (``llm.0``: the projector,
        whose output it sees)."""
        if site not in self.sites():
            raise TokensieveError(f"site {site} does not exist here; sites are {', '.join(map(str, self.sites()))}")
        if site.stage == "vision":
            return self.vision_layers[site.layer]
        if site.before_llm:
            return self.projector
        return self.llm_layers[site.layer]

    def prefix_tokens(self, site: Site) -> int:
        """Leading tokens at ``site`` that are never removed (CLS in the tower, and before the LLM
        when ``vision_feature_select_strategy`` feeds it to the LLM)."""
        if site.stage == "vision":
            return 1
        return int(self.keeps_cls) if site.before_llm else 0

    def layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TokenLayout:
        """Image run and question tokens of each row of ``input_ids`` ``(B, L)``."""
        real = attention_mask.bool()
        is_image = (input_ids == self.image_token_id) & real
        count = is_image.sum(1)
        start = is_image.int().argmax(1)
        last = input_ids.shape[1] - 1 - is_image.flip(1).int().argmax(1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        before = (real & (positions < start[:, None])).sum(1)  # real columns before the run
        # Both refusals and each row's run read back from the device at once: one wait.
        checks = torch.stack([(count == 0).any(), (last - start + 1 != count).any()]).long()
        values = torch.cat([checks, before, count, (~real).sum(1)]).tolist()
        if values[0]:
            raise TokensieveError("a prompt has no <image> token")
        if values[1]:
            raise TokensieveError("the <image> tokens of a prompt are not one contiguous run")
        b = input_ids.shape[0]
        images = [RowImage(*row) for row in zip(values[2: 2 + b], values[2 + b: 2 + 2 * b], values[2 + 2 * b:])]
        question = real & (positions >= (start + count)[:, None])
        return TokenLayout(start, count, question, images)

    # --- pruning ------------------------------------------------------------------------
    def install(self, handle, seed: int = 0) -> None:
        """Register the hooks of ``handle``'s stages (called by :func:`tokensieve.attach`)."""
        session = LlavaPruningSession(self, handle, seed)
        self._sessions.append(session)
        handle.hooks.append(_Forget(self._sessions, session))

    def _active_sessions(self) -> list:
        return [s for s in self._sessions if s.handle.active]

    # --- running the model --------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One vision-tower pass + projector, as LLaVA does it: ``(B, 3, H, W)`` -> ``(B, N, d_text)``.

        Hooks at vision and projector sites act during this call.
        """
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(list(out.pooler_output))

    def assemble(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_embeds: torch.Tensor | Sequence[torch.Tensor], layout: TokenLayout | None = None
                 ) -> AssembledInputs:
        """Put the visual tokens of each row into its placeholder run, shrinking the run to fit.

        input_ids, attention_mask: ``(B, L)`` left-padded prompts with full placeholder runs.
        image_embeds: ``(B, M, d)`` or one ``(M_b, d)`` per row (rows may keep different counts).
        layout: the prompts' :meth:`layout`, when already found.
        Positions follow the attention mask (``cumsum - 1``), as ``generate()`` computes them,
        so a row gives the same result alone or in a padded batch.
        """
        layout = self.layout(input_ids, attention_mask) if layout is None else layout
        alive = None
        for session in self._active_sessions():
            mask = session.image_mask_for_llm()
            if mask is not None:  # soft: tokens dropped before the LLM are masked, positions skip them
                alive = torch.cat([mask.new_ones(mask.shape[0], 1), mask], 1) if self.keeps_cls else mask
        inputs = assemble_rows(self.model.get_input_embeddings(), input_ids, attention_mask, layout.images,
                               image_embeds, self.image_token_id, self.config.text_config.pad_token_id, alive)
        ids, is_image = inputs.input_ids, inputs.input_ids == self.image_token_id
        for session in self._active_sessions():
            session.begin_llm_pass(is_image.int().argmax(1), len(image_embeds[0]), ids.shape[1])
        return inputs

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                kept: torch.Tensor | Sequence[torch.Tensor] | None = None,
                answer_mask: torch.Tensor | None = None) -> AssembledInputs:
        """Encode images and assemble the LLM input.

        kept: optional indices into the N visual tokens per row (``(B, M)`` or one ``(M_b,)``
        per row), increasing: only these enter the LLM, in image order.
        answer_mask: optional ``(B, L)`` positions of a teacher-forced sequence that methods
        reading the question must not see (the answers and every token after the first one).
        The prompts may be padded on either side; they are read as padded on the left.
        """
        attention_mask, input_ids, answer_mask = left_padded(attention_mask, input_ids, answer_mask)
        layout = self.layout(input_ids, attention_mask)
        for session in self._active_sessions():
            session.begin_prompt(input_ids, layout, answer_mask)
        features = self.encode_images(pixel_values)
        if kept is not None:
            features = [f[k] for f, k in zip(features, _checked_kept(kept, *features.shape[:2]))]
        return self.assemble(input_ids, attention_mask, features, layout)

    def forward(self, input_ids, attention_mask, pixel_values, kept=None, answer_mask=None, **kwargs):
        """Logits ``(B, L', vocab)`` of the assembled sequence (``L' < L`` when tokens were dropped)."""
        inputs = self.prepare(input_ids, attention_mask, pixel_values, kept, answer_mask)
        return self.model(**inputs.model_kwargs(), **kwargs)

    def generate(self, input_ids, attention_mask, pixel_values, kept=None, **generate_kwargs) -> torch.Tensor:
        """New token ids ``(B, T_new)``; decoding uses the KV cache of the assembled prompt."""
        inputs = self.prepare(input_ids, attention_mask, pixel_values, kept)
        return self.model.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                   **generate_kwargs)

    @contextlib.contextmanager
    def capture_cls_attention(self, layer: int = -1) -> Iterator[list[torch.Tensor]]:
        """Record vision block ``layer``'s CLS-row attention over the patch tokens.

        Yields a list that receives one ``(B, N_patches)`` tensor (mean over heads) per tower
        pass; recomputed from the block's q/k projections so fused attention stays on.
        """
        attn = self.vision_layers[layer].self_attn
        captured: list[torch.Tensor] = []

        def hook(_module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            row = layer_cls_attention(hidden, attn.q_proj, attn.k_proj(hidden), attn.num_heads, attn.scale)
            captured.append(row[:, 1:].detach())

        handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield captured
        finally:
            handle.remove()


def _checked_kept(kept: torch.Tensor | Sequence, rows: int, n_tokens: int) -> list[torch.Tensor]:
    """``kept`` as one ``(M_b,)`` index tensor per row, refused unless each row holds increasing
    (sorted, distinct) integers in ``[0, n_tokens)``."""
    if len(kept) != rows:
        raise TokensieveError(f"kept has {len(kept)} rows for a batch of {rows}")
    return [checked_indices(row, n_tokens, f"kept row {b}") for b, row in enumerate(kept)]


@dataclass
class _Forget:
    """A hook-like handle whose ``remove()`` drops a session from its backbone."""

    sessions: list
    session: object

    def remove(self) -> None:
        if self.session in self.sessions:
            self.sessions.remove(self.session)
