"""An lmms-eval model: a LLaVA, Qwen-VL, LLaVA-NeXT or LLaVA-OneVision checkpoint with a tokensieve method or
a trained pruner attached.

Registered through the ``lmms_eval.models`` entry point as ``tokensieve``::

    lmms-eval --model tokensieve --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=0.25 \\
        --tasks mme,pope --batch_size 1

Model arguments: ``pretrained`` (a LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision or
LLaVA-NeXT-Video checkpoint folder or hub id, the backbone chosen by its ``model_type``; default the shipped testbed),
``method`` (a registered method name) or ``pruner`` (a ``tokensieve train`` run folder),
``budget`` (the method's: a count or a ratio), ``centres`` (the pruner's: the tokens its merger sends
into the LLM, a count or a ratio; default as trained), ``site`` (default the method's own), ``mode`` (``hard``, ``soft`` or ``origin``),
``dtype`` (``float32``, ``bfloat16``, ``float16``), ``device``, ``batch_size`` and ``frames`` (how many
frames of a video are read, evenly spaced; default 8).

Every prompt is the document's visuals then its text, in the model's own format
(:mod:`tokensieve.backbones.chat_format`): LLaVA-1.5's (``USER: <image>\\n... ASSISTANT:``, exactly one
image), the Qwen-VL chat turn (images of any size and videos, one or more), LLaVA-NeXT's and NeXT-Video's
(its chat template, else LLaVA-1.5's) or LLaVA-OneVision's (one image of any size, or one video, on
OneVision and NeXT-Video). lmms-eval gives a video as its file's path: its frames are read with PyAV
(:func:`read_video`; on Qwen-VL with their timestamps, which the processor is not left to sample again).
The visuals are in the context of both request types: ``loglikelihood`` scores the continuation tokens of
the full visuals + context + continuation sequence, and a generation error is raised, never turned into an
empty answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from tokensieve.errors import TokensieveError

MODEL_NAME = "tokensieve"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_TOKEN = "<image>"


def manifest():
    """The ``lmms_eval.models`` entry point: registers :class:`TokensieveModel` as ``tokensieve``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.TokensieveModel")


@dataclass(frozen=True)
class Video:
    """A video read from its file: ``frames`` ``(T, H, W, 3)`` uint8, and the ``metadata`` that gives them their
    times (the file's fps, the frames' indices in it: transformers' ``VideoMetadata``)."""

    frames: np.ndarray
    metadata: object


def read_video(path: str, frames: int, where: str = "") -> Video:
    """``frames`` frames evenly spaced over the video file at ``path`` (all of them when it has fewer), read
    with PyAV. where: what names the video in a refusal (``task T, doc D``)."""
    from transformers.video_utils import load_video

    if not Path(path).is_file():
        raise TokensieveError(f"{where + ': ' if where else ''}the video {path} is not a file")

    def evenly(metadata, **_):  # transformers' uniform rule, but a clip of fewer frames is read whole
        total = metadata.total_num_frames
        count = min(frames, total)
        return np.arange(count) * total // count

    try:
        return Video(*load_video(path, backend="pyav", sample_indices_fn=evenly))
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokensieveError(f"{where + ': ' if where else ''}cannot read the video {path}: {text}") from None


def _default_device() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # one GPU per process under accelerate launch


class TokensieveModel(lmms):
    """A LLaVA or Qwen-VL backbone with ``method`` attached at ``budget``, or ``pruner`` at ``centres`` (see
    the module)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str | None = None,
                 budget: int | float | str | None = None, site: str | None = None, mode: str = "hard",
                 pruner: str | None = None, centres: int | float | str | None = None, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = 1, frames: int | str = 8, **unknown):
        super().__init__()
        from tokensieve.backbones.load import load_backbone
        from tokensieve.method import Budget
        from tokensieve.methods import method_class

        if unknown:
            raise TokensieveError(f"unknown tokensieve model argument(s) {', '.join(sorted(unknown))}; known: "
                                  "pretrained, method, budget, site, mode, pruner, centres, dtype, device, batch_size, "
                                  "frames")
        if method is not None and pruner is not None:
            raise TokensieveError("give method=NAME or pruner=RUN_DIR, not both")
        if method is not None:
            if method_class(method).trained:  # an unknown name fails here, before the model loads
                raise TokensieveError(f"method={method} is learned; give pruner=RUN_DIR (a tokensieve train run folder)")
            if budget is None:
                raise TokensieveError(f"method={method} needs budget=: a count (64) or a ratio (0.25)")
        if budget is not None:
            if method is None:
                raise TokensieveError(f"budget={budget} needs method=NAME (a trained pruner takes centres=)")
            Budget.parse(str(budget))
        if centres is not None:
            if pruner is None:
                raise TokensieveError(f"centres={centres} needs pruner=RUN_DIR (a method takes budget=)")
            Budget.parse(str(centres))
        if dtype is not None and dtype not in DTYPES:
            raise TokensieveError(f"dtype={dtype} is not one of {', '.join(DTYPES)}")
        if not str(frames).isdigit() or int(frames) < 1:
            raise TokensieveError(f"frames={frames}: give how many frames of a video to read, a positive integer")
        self.frames = int(frames)
        self.batch_size_per_gpu = int(batch_size)
        self._device = torch.device(device or _default_device())
        self.backbone = load_backbone(pretrained, dtype=DTYPES.get(dtype), device=self._device)
        if self.backbone.processor is None:
            raise TokensieveError(f"{pretrained} has no processor files; lmms-eval needs one to read prompts")
        self.backbone.processor.tokenizer.padding_side = "left"  # every row ends at the last position
        self.handle = self._attach(method, budget, site, mode, pruner, centres)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TokensieveModel:
        """How lmms-eval builds the model: ``--model_args`` plus its own ``--batch_size`` and ``--device``.

        lmms-eval always passes ``batch_size`` (its flag defaults to 1), so a ``batch_size`` in
        ``--model_args`` would be given twice; the ``--model_args`` value wins."""
        from lmms_eval.utils import simple_parse_args_string

        given = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in given}
        return cls(**given, **extra)

    def _attach(self, method, budget, site, mode, pruner, centres):
        from tokensieve.attach import attach

        if pruner is not None:
            from tokensieve.pruner import TwoStagePruner

            return TwoStagePruner.from_pretrained(pruner, self.backbone).to(self._device).attach(
                self.backbone, mode, centres=None if centres is None else str(centres))
        if method is not None:
            return attach(self.backbone, method, str(budget), site=site, mode=mode)
        return None

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self):
        return self.backbone.processor.tokenizer

    # --- requests -----------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        """The document's visuals in order: an image (RGB) as it is, a video (lmms-eval gives its file's path)
        as a :class:`Video` (:func:`read_video`); one on the LLaVA families, one or more on Qwen-VL."""
        from PIL import Image

        from tokensieve.backbones.load import is_qwen

        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        where = f"task {task}, doc {doc_id}"
        if not visuals:
            raise TokensieveError(f"{where}: the document has no image or video; the tokensieve model needs one")
        if len(visuals) > 1 and not is_qwen(self.backbone):
            raise TokensieveError(f"{where}: the {getattr(self.backbone, 'family_name', 'LLaVA')} backbone evaluates "
                                  f"prompts with exactly one image or video, this one has {len(visuals)}")
        read = []
        for visual in visuals:
            if isinstance(visual, Image.Image):
                read.append(visual.convert("RGB"))
            elif isinstance(visual, str):
                read.append(read_video(visual, self.frames, where))
            else:
                raise TokensieveError(f"{where}: a visual of type {type(visual).__name__}; the tokensieve model takes "
                                      "images and video file paths")
        return read

    def _prompt(self, context: str, visuals: list) -> str:
        from tokensieve.backbones.chat_format import prompt_text

        return prompt_text(self.backbone, context.replace(IMAGE_TOKEN, "").strip(),
                           ["video" if isinstance(v, Video) else "image" for v in visuals])

    def _encode(self, texts: Sequence[str], visuals: list) -> dict[str, torch.Tensor]:
        """Processor inputs of ``texts`` and the visuals of all of them (in order), on the device;
        pixels in the model's dtype."""
        from tokensieve.backbones.load import is_qwen

        images = [v for v in visuals if not isinstance(v, Video)]
        videos = [v for v in visuals if isinstance(v, Video)]
        clips = {}
        if videos:  # the frames read are the frames the model sees: the processor must not sample them again
            clips = {"videos": [v.frames for v in videos], "do_sample_frames": False}
            if is_qwen(self.backbone):  # their times: Qwen3-VL's timestamps, Qwen2.5-VL's seconds per patch
                clips["video_metadata"] = [v.metadata for v in videos]
        batch = self.backbone.processor(images=images or None, text=list(texts), return_tensors="pt", padding=True,
                                        **clips)
        dtype = self.backbone.model.dtype
        return {k: v.to(self._device, dtype) if k.startswith("pixel_values") else v.to(self._device)
                for k, v in batch.items()}

    def _chunks(self, requests: list[Instance], same=lambda args: None):
        """Consecutive runs of at most ``batch_size`` requests on which ``same(args)`` agrees."""
        chunk: list[Instance] = []
        for request in requests:
            if chunk and (len(chunk) == self.batch_size or same(request.args) != same(chunk[0].args)):
                yield chunk
                chunk = []
            chunk.append(request)
        if chunk:
            yield chunk

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(loss, is_greedy)`` per request: loss is minus the log-probability of the continuation
        given the visuals and the context (summed over its tokens), the convention lmms-eval's own
        scorers assume (``multiple_choice`` takes the argmin); is_greedy: every continuation token
        is the argmax."""
        results = []
        for chunk in self._chunks(requests):
            contexts, continuations, media = [], [], []
            for context, target, doc_to_visual, doc_id, task, split in (r.args for r in chunk):
                doc = self.task_dict[task][split][doc_id]
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                contexts.append(self._prompt(context, visuals))
                continuations.append(target if isinstance(target, str) else target(doc))
                media.extend(visuals)
            full = [c + k for c, k in zip(contexts, continuations)]
            # The placeholder expands to the same visual tokens in both, so the difference counts the continuation.
            tokenize = self.tokenizer
            lengths = [len(tokenize(f)["input_ids"]) - len(tokenize(c)["input_ids"]) for f, c in zip(full, contexts)]
            if min(lengths) < 1:
                empty = continuations[lengths.index(min(lengths))]
                raise TokensieveError(f"an empty continuation cannot be scored: {empty!r}")
            batch = self._encode(full, media)
            logits = self.backbone.forward(**batch).logits.float()
            for row, n in enumerate(lengths):
                # Left padding: each row ends at the last position, whatever was removed from its image run.
                logp = torch.log_softmax(logits[row, -n - 1:-1], -1)
                target = batch["input_ids"][row, -n:]
                loss = -logp.gather(-1, target[:, None]).sum()
                results.append((float(loss), bool((logp.argmax(-1) == target).all())))
        return results

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, with ``temperature`` > 0) answers, cut at the first ``until`` string."""
        results = []
        for chunk in self._chunks(requests, same=lambda args: repr(sorted(args[1].items()))):
            gen = dict(chunk[0].args[1])
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            texts, media = [], []
            for context, _, doc_to_visual, doc_id, task, split in (r.args for r in chunk):
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                texts.append(self._prompt(context, visuals))
                media.extend(visuals)
            temperature = float(gen.get("temperature") or 0)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": gen.get("top_p")} if temperature > 0 \
                else {"do_sample": False}
            new = self.backbone.generate(**self._encode(texts, media),
                                         max_new_tokens=int(gen.get("max_new_tokens", 128)),
                                         num_beams=int(gen.get("num_beams") or 1),
                                         pad_token_id=self.tokenizer.pad_token_id,
                                         eos_token_id=self.tokenizer.eos_token_id, **sampling)
            for answer in self.tokenizer.batch_decode(new, skip_special_tokens=True):
                for stop in until:
                    answer = answer.split(stop)[0] if stop else answer
                results.append(answer.strip())
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise TokensieveError("the tokensieve lmms-eval model does not support multi-round generation")
