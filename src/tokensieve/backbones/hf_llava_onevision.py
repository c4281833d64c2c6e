"""Adapter for transformers' ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision: anyres-max images
and videos, a SigLIP tower and a Qwen2 LLM).

The LLaVA-NeXT adapter (:mod:`.hf_llava_next`) with OneVision's model class, layouts and inputs; the same
module paths (transformers 5.x: ``model.model.vision_tower``, ``.multi_modal_projector``,
``.image_newline``, ``.language_model``). Each prompt holds one image or one video (v1); rows of a batch
may hold images of different sizes and videos.

* An image is packed as on LLaVA-NeXT (a base grid, then the unpadded canvas of its crops with a newline
  after every canvas row), except that a canvas of more than about ``N`` crops' tokens
  (``vision_aspect_ratio`` ``anyres_max_N``) is first interpolated down, bilinearly: its tokens are then
  mixes of patches, and :class:`~tokensieve.backbones.anyres_layout.AnyresLayout` says so
  (``source`` -1, ``resampled_from``).
* A video's frames go through the tower and projector as crops and are pooled bilinearly to half their
  side; one newline ends the whole video (:mod:`.pooled_video`). A method sees it as a visual unit of
  ``frames x rows x cols`` (``SiteInputs.units``); only methods that declare ``handles_video`` are
  given one (any other is refused in one line in a pass that holds a video).

Sites and newline policy as on LLaVA-NeXT (``llm.0`` per image or video, ``llm.k`` per row; newlines kept,
outside the budget). ``projector_input`` at ``llm.0`` is the tower feature behind each token, resampled
(canvas interpolation, video pooling) exactly as the model resamples the projector's output. SigLIP has no
CLS token: methods reading CLS attention are refused at attach.
"""

from __future__ import annotations

import math

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from tokensieve.backbones.anyres_layout import AnyresLayout, anyres_layout
from tokensieve.backbones.anyres_pruning import LLM0
from tokensieve.backbones.base import Site
from tokensieve.backbones.hf_llava_next import LlavaNextBackbone
from tokensieve.backbones.onevision_prompt import ANSWER_CUE
from tokensieve.backbones.pooled_video import PooledVideoLayout
from tokensieve.backbones.row_llm import LLM_SIGNALS


class LlavaOnevisionBackbone(LlavaNextBackbone):
    """A LLaVA-OneVision model (and its processor) seen through per-image anyres-max layouts and per-video
    pooled frame layouts."""

    family_name = "LLaVA-OneVision"
    model_type = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    units_word = "image or video"
    visual_inputs = ("pixel_values_videos", "image_sizes_videos", "batch_num_images")
    answer_cue = ANSWER_CUE
    image_processor_apart = True  # its processor also holds a video processor, which has no PIL backend
    tower_has_cls = False  # SigLIP
    takes_video = True
    splits = ("all", "even")  # HiRED's rule reads the base image's CLS attention, which SigLIP has not

    @property
    def max_patches(self) -> int:
        """``N`` of ``vision_aspect_ratio`` ``anyres_max_N``."""
        return int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))

    def image_layout(self, image_size) -> AnyresLayout:
        """The packed run of an image of ``image_size`` ``(height, width)``."""
        return anyres_layout(image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size,
                             self.crop_grid, max_patches=self.max_patches)

    def video_layout(self, frames: int) -> PooledVideoLayout:
        """The run of a video of ``frames`` frames."""
        return PooledVideoLayout(frames, self.crop_grid)

    def most_image_tokens(self) -> int:
        """At most the candidate tokens one image gives (newlines left out): the base grid and a canvas no
        larger than the largest pinpoint's, which the model keeps only up to 1.1^2 x ``N`` crops' tokens."""
        crop, per_crop = self.config.vision_config.image_size, self.crop_grid**2
        largest = max((h // crop) * (w // crop) for h, w in self.config.image_grid_pinpoints) * per_crop
        return per_crop + min(largest, math.floor(1.1**2 * self.max_patches * per_crop))

    def signals_at(self, site: Site) -> set[str]:
        """At ``llm.0``: ``projector_input`` ``(1, N, d_v)`` (the tower feature behind each token, resampled
        as the model resamples the projector's output); at ``llm.k``: ``text_attention``,
        ``prev_layer_keys``, ``normed_states``, ``positions`` and ``layer_text_attention``. No CLS signals
        (SigLIP has no CLS token)."""
        if site not in self.sites():
            return set()
        return {"projector_input"} if site == LLM0 else set(LLM_SIGNALS)

    def encode_units(self, kinds: list[str], pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None,
                     pixel_values_videos: torch.Tensor | None = None, image_sizes_videos=None,
                     batch_num_images=None) -> tuple[list[torch.Tensor], list]:
        """As :meth:`LlavaNextBackbone.encode_units`. ``image_sizes_videos`` is not read (nor by the model);
        ``batch_num_images`` is one image per prompt here, as checked."""
        return super().encode_units(kinds, pixel_values, image_sizes, pixel_values_videos)
