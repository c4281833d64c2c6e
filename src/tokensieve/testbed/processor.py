"""The testbed's offline tokenizer and ``LlavaProcessor``, built locally (no hub)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from tokensieve.data.synthetic import SceneSpec, vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
# CLIP's normalisation constants, as real LLaVA image processors use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the synthetic vocabulary, prepending ``<s>``."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(vocabulary()))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left",  # left padding so the last position is each prompt's answer slot
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def build_processor(spec: SceneSpec = SceneSpec()) -> LlavaProcessor:
    """``LlavaProcessor`` that expands ``<image>`` to one token per patch (CLS dropped)."""
    # The PIL backend: torchvision (the default backend's need) has no CPU build here.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
