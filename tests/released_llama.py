"""A reference run's tiny 32-layer Llama (d=32, 2 heads) inside a LLaVA, for whole-model parity
tests: the fixtures of PyramidDrop and SparseVLM store its weights and its input embeddings
(35 text tokens, 576 image tokens, 40 text tokens)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tokensieve.backbones import LlavaBackbone


def released_model_as_llava(tensors: dict) -> tuple[LlavaBackbone, torch.Tensor, torch.Tensor]:
    """The fixture's 32-layer Llama inside a LLaVA whose image features are the fixture's image
    embeddings: ``(backbone, input_ids, image_embeds)``. Text tokens get ids whose embedding rows
    are the fixture's text embeddings, so the assembled input is exactly the released run's."""
    embeds = tensors["inputs_embeds"][0]  # (651, 32): 35 text, 576 image, 40 text
    text = torch.cat([embeds[:35], embeds[611:]])
    image_token = len(text)
    text_config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=32, num_attention_heads=2,
                              num_key_value_heads=2, rope_theta=1e4, rms_norm_eps=1e-5, vocab_size=image_token + 1,
                              max_position_embeddings=2048)
    vision_config = {"model_type": "clip_vision_model", "hidden_size": 8, "intermediate_size": 8,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 48, "patch_size": 2}
    config = LlavaConfig(text_config=text_config, vision_config=vision_config, image_token_id=image_token,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    state = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
    state["embed_tokens.weight"] = torch.cat([text, torch.zeros(1, 32)])
    model.model.language_model.load_state_dict(state)
    ids = torch.cat([torch.arange(35), torch.full((576,), image_token), torch.arange(35, 75)])[None]
    return LlavaBackbone(model), ids, embeds[35:611][None]
