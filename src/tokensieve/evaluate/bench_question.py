"""The question of a bench prompt as text, and a random CLIP text encoder of a real size, so that a method
reading the question through CLIP (CDPruner) runs in ``bench speed`` with all the work it does.

A bench prompt's words are random token ids. :func:`question_processor` gives each id a word of its
own (``w<id>``), so the question decodes to as many words as it has tokens, and the CLIP tokeniser
of :func:`bench_clip_encoder` reads each word as one token (plus start and end): the text tower sees
about as many tokens as a real question of that length gives, in one 77-token segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from tokensieve.methods.cdpruner import CDPruner, ClipTextEncoder


@dataclass(frozen=True)
class ClipTextSize:
    """A CLIP text tower and its vocabulary. The defaults fit a CPU: CLIP-L/14's text tower scaled as the
    CPU shapes' vision towers are scaled from CLIP-L/14's (width / 4, depth / 12); :meth:`clip_l` is the
    text tower of ``openai/clip-vit-large-patch14-336``, the CLIP of LLaVA-1.5 and LLaVA-NeXT."""

    layers: int = 1
    hidden: int = 192
    heads: int = 3
    intermediate: int = 768
    projection: int = 192
    positions: int = 77
    vocab: int = 49408

    @classmethod
    def clip_l(cls) -> ClipTextSize:
        return cls(layers=12, hidden=768, heads=12, intermediate=3072, projection=768)


def _word_tokenizer(words: dict[str, int], unknown: str, template: str | None = None):
    """A fast tokeniser that splits on whitespace and maps each word to one id (``unknown`` where it has none);
    ``template``: a ``TemplateProcessing`` single-sequence template around the words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(words, unk_token=unknown))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if template:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, words[t]) for t in template.split() if t in words])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=unknown)


def question_processor(vocab: int) -> SimpleNamespace:
    """What a backbone adapter asks of a processor to read a prompt's question as text: its ``tokenizer``,
    which decodes token id ``i < vocab`` as the word ``w<i>``."""
    return SimpleNamespace(tokenizer=_word_tokenizer({f"w{i}": i for i in range(vocab)} | {"<unk>": vocab}, "<unk>"))


def bench_clip_encoder(size: ClipTextSize, vision_width: int, device: str = "cpu") -> ClipTextEncoder:
    """A random CLIP text tower of ``size`` with a ``vision_width``-wide ``post_layernorm`` and
    ``visual_projection`` (the projector input's width), in float32 as CDPruner loads CLIP; its tokeniser
    reads the word ``w<i>`` as one token (an unknown word where ``i`` passes the vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    specials = {"<|startoftext|>": size.vocab - 2, "<|endoftext|>": size.vocab - 1}
    words = {f"w{i}": i for i in range(size.vocab - 3)} | {"<unk>": size.vocab - 3} | specials
    tokenizer = _word_tokenizer(words, "<unk>", template="<|startoftext|> $A <|endoftext|>")
    config = CLIPTextConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                            num_hidden_layers=size.layers, num_attention_heads=size.heads,
                            max_position_embeddings=size.positions, projection_dim=size.projection,
                            bos_token_id=specials["<|startoftext|>"], eos_token_id=specials["<|endoftext|>"],
                            pad_token_id=0)
    with torch.random.fork_rng(devices=[]):  # the bench's own seeded draws stay as they were
        torch.manual_seed(0)
        text = CLIPTextModelWithProjection(config)
        norm, projection = nn.LayerNorm(vision_width), nn.Linear(vision_width, size.projection, bias=False)
    return ClipTextEncoder(tokenizer, text, norm, projection).to(device)


def with_clip_encoder(method, shape, device: str, built: dict):
    """``method``, given the shape's random CLIP text encoder (:func:`bench_clip_encoder` of its ``clip_text`` and
    ``projector_input_width``) if it is CDPruner without a checkpoint of its own (``text_encoder``); built: the
    encoders built so far in this run, by shape (one per run, whatever the cases)."""
    if isinstance(method, CDPruner) and method.encoder is None and method.text_encoder is None:
        if shape not in built:
            built[shape] = bench_clip_encoder(shape.clip_text, shape.projector_input_width, device)
        method.encoder = built[shape]
    return method
