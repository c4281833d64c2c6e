"""CDPruner against the authors' released code (tests/fixtures/parity/cdpruner.*): the same kept
tokens, to the index, at the paper's budgets 64 / 128 / 192 of 576, from the same CLIP embeddings;
exact ties; and the whole path from question text and projector input through a tiny CLIP, whose
text and patch embeddings match theirs."""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import assert_close_relative, load_fixture
from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

from tokensieve.method import SiteInputs
from tokensieve.methods import create_method
from tokensieve.methods.cdpruner import cdpruner_relevance, conditional_dpp_keep

TENSORS, META = load_fixture("cdpruner")
BUDGETS = (64, 128, 192)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """The driver's tiny CLIP and tokenizer saved as a checkpoint folder (its vision encoder and
    logit scale, which the relevance never reads, freshly initialised)."""
    model = CLIPModel(CLIPConfig(**META["clip_config"]))
    weights = {k[len("clip."):]: v for k, v in TENSORS.items() if k.startswith("clip.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k == "logit_scale" or k.startswith("vision_model.") and "post_layernorm" not in k
                                  for k in missing)
    folder = tmp_path_factory.mktemp("cdpruner_clip")
    model.save_pretrained(folder)
    CLIPTokenizerFast(vocab=META["clip_vocab"], merges=[]).save_pretrained(folder)
    return folder


def test_fixture_is_the_paper_configuration():
    assert TENSORS["dpp_tokens"].shape[1] == 576 and TENSORS["text_projector_input"].shape[1] == 576
    assert all(TENSORS[f"dpp_kept_{k}"].shape == (2, k) for k in BUDGETS)
    assert TENSORS["dpp_text_embeds_1"].shape[0] == 3 and TENSORS["text_text_embeds_1"].shape[0] > 1  # segments


@pytest.mark.parametrize("keep", BUDGETS)
def test_kept_tokens_match_the_reference(keep):
    """Two rows in one batch, each equal to the reference run on that row alone."""
    relevance = cdpruner_relevance(TENSORS["dpp_image_embeds"], [TENSORS["dpp_text_embeds_0"], TENSORS["dpp_text_embeds_1"]])
    kept = conditional_dpp_keep(TENSORS["dpp_tokens"], relevance, keep)
    assert torch.equal(kept, TENSORS[f"dpp_kept_{keep}"])


def test_the_relevance_sign_and_the_diversity_both_matter():
    """The fixture tells the reference's choices apart from near misses: plain top relevance,
    relevance of the opposite sign, and diversity alone all keep other tokens."""
    texts = [TENSORS["dpp_text_embeds_0"], TENSORS["dpp_text_embeds_1"]]
    relevance = cdpruner_relevance(TENSORS["dpp_image_embeds"], texts)
    expected = TENSORS["dpp_kept_64"]
    assert not torch.equal(relevance.topk(64, 1).indices.sort(1).values, expected)
    flipped = cdpruner_relevance(-TENSORS["dpp_image_embeds"], texts)
    assert not torch.equal(conditional_dpp_keep(TENSORS["dpp_tokens"], flipped, 64), expected)
    assert not torch.equal(conditional_dpp_keep(TENSORS["dpp_tokens"], torch.ones_like(relevance), 64), expected)


def test_exact_ties_go_to_the_lowest_index():
    relevance = cdpruner_relevance(TENSORS["tie_image_embeds"], [TENSORS["tie_text_embeds"]])
    assert torch.equal(conditional_dpp_keep(TENSORS["tie_tokens"], relevance, 30), TENSORS["tie_kept_30"])


def test_clip_embeddings_match_the_reference(clip_folder):
    method = create_method("cdpruner", text_encoder=str(clip_folder))
    method.check(576, 64, "llm.0")
    texts = method.encoder.embed_texts([method.question_for_clip(q) for q in META["questions"]])
    patches = method.encoder.embed_patches(TENSORS["text_projector_input"])
    for row, text in enumerate(texts):
        assert_close_relative(text, TENSORS[f"text_text_embeds_{row}"])
        assert_close_relative(patches[row : row + 1], TENSORS[f"text_image_embeds_{row}"])


@pytest.mark.parametrize("keep", BUDGETS)
def test_select_from_question_text_matches_the_reference(clip_folder, keep):
    """The method as the engine calls it: raw question texts (answer-format phrase included), the
    projector's input as a signal, the post-projector tokens; both rows in one batch."""
    method = create_method("cdpruner", text_encoder=str(clip_folder))
    tokens = TENSORS["dpp_tokens"][:1].expand(2, -1, -1)
    inputs = SiteInputs(tokens, keep, "llm.0", [], {"projector_input": lambda: TENSORS["text_projector_input"]},
                        question_text=lambda: list(META["questions"]))
    assert torch.equal(method.select(inputs).indices, TENSORS[f"text_kept_{keep}"])
