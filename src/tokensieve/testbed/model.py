"""Build the testbed: a real ``LlavaForConditionalGeneration`` with a small CLIP tower and Llama."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tokensieve.data.synthetic import SceneSpec


@dataclass(frozen=True)
class TestbedSize:
    """Widths and depths of the testbed's two transformers."""

    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 8  # deep enough that the image is still read after layer 2, as in LLaVA-7B
    text_heads: int = 4


def build_testbed_model(
    vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int, image_token_id: int,
    spec: SceneSpec = SceneSpec(), size: TestbedSize = TestbedSize(),
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA whose tower yields ``spec.n_patches`` visual tokens.

    Features come from the tower's last layer (``vision_feature_layer=-1``): with LLaVA's
    default -2 the last layer would never be used and so never trained.
    """
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.text_hidden, intermediate_size=4 * size.text_hidden,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads, max_position_embeddings=512,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=spec.n_patches, projector_hidden_act="gelu",
    )
    config.pad_token_id = pad_token_id
    return LlavaForConditionalGeneration(config).eval()
