"""Shared fixtures: a tiny LLaVA-architecture model saved locally and reloaded, on the CPU; the tiny
Qwen-VL models of every family, the tiny LLaVA-NeXT and the tiny LLaVA-OneVision, saved locally."""

from __future__ import annotations

import pytest
import torch
from tiny_llava_next import ROWS as NEXT_ROWS
from tiny_llava_next import inputs as next_inputs
from tiny_llava_next import save_tiny_llava_next
from tiny_next_video import ROWS as NV_ROWS
from tiny_next_video import inputs as nv_inputs
from tiny_next_video import save_tiny_next_video
from tiny_onevision import ROWS as OV_ROWS
from tiny_onevision import inputs as ov_inputs
from tiny_onevision import save_tiny_onevision
from tiny_qwen import FAMILIES, ROWS, inputs, save_tiny_qwen

from tokensieve.data.synthetic import SceneSpec, make_sample
from tokensieve.testbed import model as model_module
from tokensieve.testbed.model import build_testbed_model
from tokensieve.testbed.processor import build_processor

TINY_SPEC = SceneSpec(image_size=64)  # 8x8 = 64 visual tokens
TINY_SIZE = model_module.TestbedSize(vision_hidden=32, vision_layers=3, vision_heads=2,
                        text_hidden=32, text_layers=3, text_heads=2)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A randomly initialised LLaVA + processor saved with ``save_pretrained``."""
    torch.manual_seed(0)
    processor = build_processor(TINY_SPEC)
    tok = processor.tokenizer
    model = build_testbed_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
                                tok.convert_tokens_to_ids("<image>"), spec=TINY_SPEC, size=TINY_SIZE)
    out = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_qwen_dir(request, tmp_path_factory):
    """One Qwen-VL family's random tiny model and processor, saved with ``save_pretrained``."""
    return save_tiny_qwen(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_samples():
    """Six samples, one or more of every question family, so prompt lengths differ."""
    return [make_sample(7, i, TINY_SPEC) for i in range(6)]


@pytest.fixture(scope="module")
def backbone(tiny_llava_dir):
    """The tiny LLaVA, loaded once per test module (a module's own ``backbone`` fixture wins)."""
    from tokensieve.backbones import LlavaBackbone

    return LlavaBackbone.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def batch(backbone, tiny_samples):
    """The six tiny samples encoded as one padded batch (a module's own ``batch`` fixture wins)."""
    from tokensieve.backbones.llava_prompt import encode

    return encode(backbone.processor, tiny_samples)



@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    """The tiny Qwen-VL model of one family, loaded once per test module."""
    from tokensieve.backbones.hf_qwen import QwenVLBackbone

    return QwenVLBackbone.from_pretrained(tiny_qwen_dir)


@pytest.fixture(scope="module")
def mixed(qwen):
    """:data:`tiny_qwen.ROWS` encoded as one left-padded batch: rows of different image sizes, one with two images."""
    return inputs(qwen, ROWS)


@pytest.fixture(scope="module")
def plain(qwen, mixed):
    """The unpruned logits ``(B, L, vocab)`` of ``mixed``."""
    with torch.no_grad():
        return qwen.forward(**mixed).logits


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tmp_path_factory):
    """The random tiny LLaVA-NeXT and its processor, saved with ``save_pretrained``."""
    return save_tiny_llava_next(tmp_path_factory.mktemp("tiny_llava_next"))


@pytest.fixture(scope="module")
def llava_next(tiny_llava_next_dir):
    """The tiny LLaVA-NeXT adapter, loaded once per test module."""
    from tokensieve.backbones.hf_llava_next import LlavaNextBackbone

    return LlavaNextBackbone.from_pretrained(tiny_llava_next_dir)


@pytest.fixture(scope="module")
def next_batch(llava_next):
    """:data:`tiny_llava_next.ROWS` as one left-padded batch: a wide, a square and a tall image."""
    return next_inputs(llava_next.processor, NEXT_ROWS)


@pytest.fixture(scope="module")
def next_plain(llava_next, next_batch):
    """The adapter's unpruned logits ``(B, L, vocab)`` of ``next_batch``."""
    with torch.no_grad():
        return llava_next.forward(**next_batch).logits


@pytest.fixture(scope="session")
def tiny_onevision_dir(tmp_path_factory):
    """The random tiny LLaVA-OneVision and its processor, saved with ``save_pretrained``."""
    return save_tiny_onevision(tmp_path_factory.mktemp("tiny_onevision"))


@pytest.fixture(scope="module")
def onevision(tiny_onevision_dir):
    """The tiny LLaVA-OneVision adapter, loaded once per test module."""
    from tokensieve.backbones.hf_llava_onevision import LlavaOnevisionBackbone

    return LlavaOnevisionBackbone.from_pretrained(tiny_onevision_dir)


@pytest.fixture(scope="module")
def ov_batch(onevision):
    """:data:`tiny_onevision.ROWS` as one left-padded batch: a wide image, a square and a long one (the
    last two interpolated)."""
    return ov_inputs(onevision.processor, OV_ROWS)


@pytest.fixture(scope="module")
def ov_plain(onevision, ov_batch):
    """The adapter's unpruned logits ``(B, L, vocab)`` of ``ov_batch``."""
    with torch.no_grad():
        return onevision.forward(**ov_batch).logits


@pytest.fixture(scope="session")
def tiny_next_video_dir(tmp_path_factory):
    """The random tiny LLaVA-NeXT-Video and its processor, saved with ``save_pretrained``."""
    return save_tiny_next_video(tmp_path_factory.mktemp("tiny_next_video"))


@pytest.fixture(scope="module")
def next_video(tiny_next_video_dir):
    """The tiny LLaVA-NeXT-Video adapter, loaded once per test module."""
    from tokensieve.backbones.hf_llava_next_video import LlavaNextVideoBackbone

    return LlavaNextVideoBackbone.from_pretrained(tiny_next_video_dir)


@pytest.fixture(scope="module")
def nv_batch(next_video):
    """:data:`tiny_next_video.ROWS` as one left-padded batch: a wide image, a video of 4 frames, a tall image."""
    return nv_inputs(next_video.processor, NV_ROWS)


@pytest.fixture(scope="module")
def nv_plain(next_video, nv_batch):
    """The adapter's unpruned logits ``(B, L, vocab)`` of ``nv_batch``."""
    with torch.no_grad():
        return next_video.forward(**nv_batch).logits
