"""CDPruner's text encoder, on a tiny CLIP made here (random weights, a byte-level CLIP tokeniser
without merges, so every character is a token): how it is given, loaded, refused, serialised, and
how the question reaches it; and the selection's edge cases (rank spent, padding, theta)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_clip_text import POSITIONS, save_tiny_clip, tokenizer
from tiny_clip_text import tiny_clip as tiny_clip_of_width
from transformers import (
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)

from tokensieve.attach import attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.shipped import shipped_testbed
from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs
from tokensieve.methods import create_method
from tokensieve.methods.cdpruner import (
    ClipTextEncoder,
    cdpruner_relevance,
    conditional_dpp_keep,
)

WIDTH = 24  # the vision tower's width, i.e. the projector input's


def tiny_clip() -> CLIPModel:
    return tiny_clip_of_width(WIDTH)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), WIDTH)


def inputs(questions: list[str], keep: int = 6, n: int = 16, width: int = WIDTH, seed: int = 0) -> SiteInputs:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(questions), n, 32, generator=g)
    states = torch.randn(len(questions), n, width, generator=g)
    return SiteInputs(tokens, keep, "llm.0", [], {"projector_input": lambda: states},
                      question_text=lambda: list(questions))


def test_without_a_text_encoder_cdpruner_says_so_in_one_line(tiny_llava_dir):
    method = create_method("cdpruner")
    for run in (lambda: method.check(64, 16, "llm.0"), lambda: method.select(inputs(["what is it?"]))):
        with pytest.raises(TokensieveError, match="cdpruner needs a CLIP text encoder: pass text_encoder=") as err:
            run()
        assert "\n" not in str(err.value)
    backbone = LlavaBackbone.from_pretrained(tiny_llava_dir)
    with pytest.raises(TokensieveError, match="cdpruner needs a CLIP text encoder"):
        attach(backbone, "cdpruner", 16)  # at its default site llm.0, before any model work
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.model.modules())


@pytest.mark.parametrize("where,message", [
    ("/no/such/clip", "cannot load the CLIP text encoder '/no/such/clip': "),
    (str(shipped_testbed()), "it is a 'llava' checkpoint; CDPruner needs a CLIP model with both towers"),
])
def test_an_unusable_text_encoder_is_refused_in_one_line(where, message):
    with pytest.raises(TokensieveError, match=message) as err:
        create_method("cdpruner", text_encoder=where).check(64, 16, "llm.0")
    assert "\n" not in str(err.value)


def test_loaded_from_a_folder_as_the_reference_loads_it(clip_dir):
    """The tokenizer, the text tower with its projection, and the vision tower's post-layernorm
    and projection, equal to the checkpoint's own."""
    encoder = ClipTextEncoder.from_pretrained(str(clip_dir))
    text = CLIPTextModelWithProjection.from_pretrained(clip_dir)
    vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir)
    ids = tokenizer()(text="a red cup", return_tensors="pt")
    torch.testing.assert_close(encoder.embed_texts(["a red cup"])[0], text(**ids).text_embeds)  # padded to 16 there
    states = torch.randn(2, 5, WIDTH)
    torch.testing.assert_close(encoder.embed_patches(states),
                               vision.visual_projection(vision.vision_model.post_layernorm(states)), rtol=0, atol=0)


def test_a_long_question_is_cut_into_segments_not_truncated(clip_dir):
    """Characters are tokens here, plus BOS and EOS: 14 characters fill one 16-token segment, 15 need
    two, the second padded with id 0 and mask 0 (a segment of its own, its last real token pooled)."""
    encoder = ClipTextEncoder.from_pretrained(str(clip_dir))
    one, two, three = encoder.embed_texts(["a" * 14, "a" * 15, "a" * 31])
    assert (one.shape[0], two.shape[0], three.shape[0]) == (1, 2, 3)
    ids = tokenizer()(text="a" * 15, return_tensors="pt").input_ids  # (1, 17)
    tail = torch.zeros(1, POSITIONS, dtype=torch.long)
    tail[0, 0] = ids[0, -1]
    mask = (torch.arange(POSITIONS) < 1).long()[None]
    torch.testing.assert_close(two[1:], encoder.text_model(input_ids=tail, attention_mask=mask).text_embeds)


def test_the_answer_format_instruction_does_not_reach_clip():
    method = create_method("cdpruner", text_encoder="unused")
    assert method.question_for_clip("What colour is the bus?\nAnswer the question using a single word or phrase.") \
        == "What colour is the bus?"
    assert method.question_for_clip("Which one?\nA. cat\nB. dog\nAnswer with the option's letter from the given "
                                    "choices directly.") == "Which one?\nA. cat\nB. dog"
    kept = create_method("cdpruner", text_encoder="unused", answer_format_phrases=())
    assert kept.question_for_clip("Is it red? Answer the question using a single word or phrase.").endswith("phrase.")


def test_config_is_plain_data_and_rebuilds_the_same_method(clip_dir):
    method = create_method("cdpruner", text_encoder=str(clip_dir))
    method.check(16, 6, "llm.0")  # loads the encoder: state, not a parameter
    config = json.loads(json.dumps(method.config()))
    assert config == {"name": "cdpruner", "text_encoder": str(clip_dir), "theta": None,
                      "answer_format_phrases": list(method.answer_format_phrases)}
    batch = inputs(["what is on the table?", "is the light on?"])
    assert torch.equal(create_method(config).select(batch).indices, method.select(batch).indices)


def test_an_encoder_held_in_memory_needs_no_checkpoint():
    model = tiny_clip()
    vision = model.vision_model
    encoder = ClipTextEncoder(tokenizer(), CLIPTextModelWithProjection(model.config.text_config).eval(),
                              vision.post_layernorm, model.visual_projection)
    method = create_method("cdpruner", encoder=encoder)
    method.check(16, 6, "llm.0")
    kept = method.select(inputs(["where is the dog?", "how many cups?"])).indices
    assert kept.shape == (2, 6) and all(row.unique().numel() == 6 for row in kept)
    assert method.config()["text_encoder"] is None and "encoder" not in method.config()


def test_the_question_steers_the_selection(clip_dir):
    method = create_method("cdpruner", text_encoder=str(clip_dir))
    chosen = {q: method.select(inputs([q], keep=4)).indices for q in ("a red cup", "zzzz 9999 ????", "the dog")}
    assert len({tuple(v[0].tolist()) for v in chosen.values()}) > 1


def test_a_vision_tower_of_another_width_is_refused(clip_dir):
    method = create_method("cdpruner", text_encoder=str(clip_dir))
    with pytest.raises(TokensieveError, match="vision tower is 24 wide, but the projector's input is 40 wide"):
        method.select(inputs(["what is it?"], width=40))


def test_one_question_text_per_row():
    method = create_method("cdpruner", encoder=object())
    bad = inputs(["one", "two"])
    bad.question_text = lambda: ["only one"]
    with pytest.raises(TokensieveError, match="1 question texts for 2 rows"):
        method.select(bad)


def test_theta_zero_ignores_the_question_and_theta_one_is_refused():
    image, text = torch.randn(1, 10, 8), [torch.randn(2, 8)]
    assert torch.equal(cdpruner_relevance(image, text, theta=0.0), torch.ones(1, 10))
    # theta 0.5: alpha = 0.5 / (2 * 0.5) = 0.5
    torch.testing.assert_close(cdpruner_relevance(image, text, theta=0.5), (0.5 * cdpruner_relevance(image, text)).exp())
    with pytest.raises(TokensieveError, match="theta 1.0 is not in"):
        create_method("cdpruner", text_encoder="x", theta=1.0)


def test_a_constant_relevance_is_one_rather_than_a_division_by_zero():
    assert torch.equal(cdpruner_relevance(torch.ones(1, 5, 4), [torch.randn(1, 4)]), torch.ones(1, 5))


def test_when_the_kernel_rank_is_spent_the_rest_go_by_relevance():
    """Two directions, exact powers of two: after one pick per direction every gain is exactly 0
    (the reference would take sqrt(0), divide and repeat indices); the rest follow relevance,
    lowest index on ties."""
    tokens = torch.eye(2)[torch.arange(8) % 2][None]  # token i points along axis i % 2
    relevance = torch.tensor([[1, 0.5, 0.25, 0.125, 0.5, 1, 0.0625, 0.25]])
    # DPP: 0 (gain 1, before 5 on the tie), then 5 (the best along axis 1); then relevance: 1, 4, 2.
    assert conditional_dpp_keep(tokens, relevance, 5).tolist() == [[0, 1, 2, 4, 5]]
    assert conditional_dpp_keep(tokens, relevance, 8).tolist() == [list(range(8))]


def test_a_spent_row_beside_others_picks_as_it_does_alone():
    """Rows spend their rank at different steps (or never); each row of the batch gives what it gives alone,
    a spent one its relevance order from its first spent step on."""
    g = torch.Generator().manual_seed(3)
    spent = torch.eye(2)[torch.arange(8) % 2].expand(3, 8, 2)  # rank 2: spent after two picks
    tokens = torch.cat([spent, torch.randn(2, 8, 2, generator=g), torch.randn(1, 8, 2, generator=g)])  # rank 2 each
    relevance = torch.rand(6, 8, generator=g)
    for keep in (1, 2, 3, 6):
        batch = conditional_dpp_keep(tokens, relevance, keep)
        alone = torch.cat([conditional_dpp_keep(tokens[b : b + 1], relevance[b : b + 1], keep) for b in range(6)])
        assert torch.equal(batch, alone)
    assert conditional_dpp_keep(tokens[:1], relevance[:1], 6)[0].unique().numel() == 6  # no pick repeated


def test_padding_is_kept_only_when_no_real_token_is_left():
    g = torch.Generator().manual_seed(1)
    tokens, relevance = torch.randn(2, 10, 16, generator=g), torch.rand(2, 10, generator=g)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, [1, 4, 7]] = False
    valid[1, 3:] = False
    kept = conditional_dpp_keep(tokens, relevance, 5, valid)
    assert not set(kept[0].tolist()) & {1, 4, 7}
    assert set(kept[1].tolist()) >= {0, 1, 2} and kept[1].unique().numel() == 5
