"""Adapter for transformers' ``LlavaNextVideoForConditionalGeneration`` (LLaVA-NeXT-Video: LLaVA-NeXT's anyres
images and videos, a CLIP tower and a Llama/Vicuna LLM).

The LLaVA-NeXT adapter (:mod:`.hf_llava_next`) with NeXT-Video's model class, its video layout and input; the
same module paths (transformers 5.x) and one more, ``model.model.vision_resampler``. Each prompt holds one
image or one video (v1); rows of a batch may hold images of different sizes and videos.

* An image is packed exactly as on LLaVA-NeXT (the model's ``get_image_features`` is NeXT's): a base grid,
  then the unpadded canvas of its crops with a newline after every canvas row.
* A video's frames go through the tower as crops, are average-pooled 2x2 (``vision_resampler``) before the
  projector and follow one another with no newline at all (:mod:`.pooled_video`). A method sees it as a
  visual unit of ``frames x rows x cols`` (``SiteInputs.units``); only methods that declare ``handles_video``
  are given one (any other is refused in one line in a pass that holds a video).

Sites, signals and newline policy as on LLaVA-NeXT (``llm.0`` per image or video, ``llm.k`` per row). The
CLIP tower has a CLS token, so the per-crop CLS rows HiRED reads exist for images (and every ``split``); a
video's ``projector_input`` is its pooled tower features, as the projector takes them.
"""

from __future__ import annotations

from transformers import LlavaNextVideoForConditionalGeneration

from tokensieve.backbones.hf_llava_next import LlavaNextBackbone
from tokensieve.backbones.pooled_video import PooledVideoLayout


class LlavaNextVideoBackbone(LlavaNextBackbone):
    """A LLaVA-NeXT-Video model (and its processor) seen through per-image anyres layouts and per-video pooled
    frame layouts."""

    family_name = "LLaVA-NeXT-Video"
    model_type = "llava_next_video"
    model_class = LlavaNextVideoForConditionalGeneration
    units_word = "image or video"
    visual_inputs = ("pixel_values_videos",)
    image_processor_apart = True  # its processor also holds a video processor, which has no PIL backend
    takes_video = True

    def video_layout(self, frames: int) -> PooledVideoLayout:
        """The run of a video of ``frames`` frames: pooled before the projector, no newline."""
        return PooledVideoLayout(frames, self.crop_grid, pooled_before_projector=True, newline=False)
