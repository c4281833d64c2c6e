"""Prefill speed of pruning on a LLaVA-, LLaVA-NeXT- or Qwen-VL-shaped model: measured speedup against the
FLOPs ideal.

The model is randomly initialised (a random model of a given shape times like a trained one): a
:class:`BenchShape` (LLaVA), a :class:`~tokensieve.evaluate.next_bench.NextBenchShape` or a
:class:`~tokensieve.evaluate.qwen_bench.QwenBenchShape`, each of
which builds its model and inputs, its ideal and its rows' native bounds (:class:`SpeedShape`).
For each (method at its site, budget ratio) the pruned and the unpruned prefill run alternately
on the same inputs, and the medians are compared. ``ideal_speedup`` is the ratio of the linear
FLOPs (dense matmuls, which grow linearly with tokens: :func:`tokensieve.evaluate.flops.prefill_flops`
without the attention-score term) of the whole prefill, full vs pruned, each block counted on
the tokens it saw (:mod:`tokensieve.evaluate.qwen_flops` for Qwen); ``scoring_overhead`` is the share of the pruned prefill spent choosing tokens,
measured in pruned runs of its own (:func:`tokensieve.evaluate.timing.scoring_shares`).

``native_bound_ms`` is the same prefill built natively with no pruning code, timed in the same
alternation (:mod:`tokensieve.evaluate.native_bounds`, :mod:`tokensieve.evaluate.qwen_bounds`), and ``ratio_to_bound`` its time over the
pruned one's: the share of the site's native bound that the pruned prefill reaches. The decoding
figures (time per token, KV cache, ``generate()``, peak memory) of the pruned model, the
unpruned one and a natively shorter prompt come from :mod:`tokensieve.evaluate.decode_speed`.

With ``compile_backend`` the three prefills (pruned, unpruned, native bound) run ``torch.compile``'d
(:mod:`tokensieve.evaluate.compiled`: the tower's, projector's and model's forwards, the shape's
``compiled_modules``; the whole native prefill), each case compiled afresh; their first calls compile and
are left out of the medians (``compile_s``: each first call's seconds). The scoring shares and
the decoding figures stay eager.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

import torch
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from tokensieve.attach import attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.evaluate.bench_question import (
    ClipTextSize,
    question_processor,
    with_clip_encoder,
)
from tokensieve.evaluate.compiled import compiled_forwards, first_call_seconds
from tokensieve.evaluate.decode_speed import decode_figures
from tokensieve.evaluate.flops import TokenCounts, prefill_flops, token_counts
from tokensieve.evaluate.native_bounds import (
    hook_free_twin,
    native_plan,
    native_prefill,
)
from tokensieve.evaluate.op_profile import profile_pair
from tokensieve.evaluate.timing import (
    alternate_timings,
    alternating_timings,
    repeated_timings,
    scoring_shares,
    synchronizer,
)
from tokensieve.methods import create_method, method_label

TARGETS = {"speedup >= 0.95 x ideal_speedup": lambda r: r["speedup"] >= 0.95 * r["ideal_speedup"],
           "scoring_overhead <= 0.03": lambda r: r["scoring_overhead"] <= 0.03}


@dataclass(frozen=True)
class BenchShape:
    """A LLaVA-shaped model. The defaults fit a CPU; ``llava7b()`` is LLaVA-1.5-7B."""

    llm_layers: int = 8
    llm_hidden: int = 512
    llm_heads: int = 8
    llm_intermediate: int = 1376  # LLaMA's 11008 / 4096 ratio
    vision_layers: int = 2
    vision_hidden: int = 256
    vision_heads: int = 4
    image_size: int = 336
    patch_size: int = 14  # 24 x 24 = 576 visual tokens, as LLaVA-1.5
    text_tokens: int = 40
    vocab: int = 32064
    clip_text: ClipTextSize = ClipTextSize()  # for methods that read the question through CLIP (CDPruner)
    always_kept: ClassVar[int] = 0  # no image token stays whatever the budget

    @classmethod
    def llava7b(cls) -> BenchShape:
        return cls(llm_layers=32, llm_hidden=4096, llm_heads=32, llm_intermediate=11008,
                   vision_layers=24, vision_hidden=1024, vision_heads=16, clip_text=ClipTextSize.clip_l())

    @property
    def projector_input_width(self) -> int:
        return self.vision_hidden

    @property
    def n_visual(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    # --- what speed_benchmark asks of a shape (SpeedShape) --------------------------------------
    def build(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlavaBackbone:
        return LlavaBackbone(build_bench_model(self, dtype, device))

    def inputs(self, batch: int = 1) -> dict[str, torch.Tensor]:
        return bench_inputs(self, batch)

    def compiled_modules(self, backbone: LlavaBackbone) -> tuple:
        return backbone.vision_tower, backbone.projector, backbone.model

    def language_model(self, backbone: LlavaBackbone):
        return backbone.language_model

    def encode(self, backbone: LlavaBackbone, inputs: dict):
        return backbone.encode_images(inputs["pixel_values"])

    def ideal_speedup(self, backbone: LlavaBackbone, handle) -> float:
        return ideal_speedup(backbone.config, token_counts(backbone, self.text_tokens),
                             token_counts(backbone, self.text_tokens, handle))

    def native_bound(self, handle, backbone: LlavaBackbone, native: LlavaBackbone, inputs: dict):
        counts = token_counts(backbone, self.text_tokens, handle)
        plan, short_kept, renumber = native_plan(handle, backbone, counts, self.text_tokens, inputs["input_ids"].shape[0])
        return (lambda: native_prefill(native, **inputs, plan=plan, renumber=renumber)), \
            short_kept.to(inputs["input_ids"].device)


class SpeedShape(Protocol):
    """What :func:`speed_benchmark` and :func:`native_llm_reference` ask of a model shape."""

    n_visual: int  # visual tokens per prompt
    text_tokens: int
    always_kept: int  # of n_visual, those every prompt keeps whatever the budget (LLaVA-NeXT's newlines)
    llm_hidden: int
    vocab: int
    clip_text: ClipTextSize  # the CLIP text tower of methods that read the question through CLIP
    projector_input_width: int

    def build(self, dtype: torch.dtype, device: str): ...  # the backbone adapter of a random model
    def inputs(self, batch: int) -> dict[str, torch.Tensor]: ...  # the adapter's forward arguments, on the CPU
    def compiled_modules(self, backbone) -> tuple: ...  # the modules whose forwards --compile compiles
    def language_model(self, backbone): ...  # the decoder stack, called with inputs_embeds
    def encode(self, backbone, inputs: dict): ...  # the tower and projector on the inputs' images
    def ideal_speedup(self, backbone, handle) -> float: ...  # linear FLOPs, unpruned over handle's pass

    def native_bound(self, handle, backbone, native, inputs: dict) -> tuple[Callable[[], object], object]:
        """``(bound, short_kept)`` of handle's latest pruned pass: the native prefill as a function
        (on ``native``, the hook-free twin) and the ``kept=`` of a natively short prompt."""


def bench_config(shape: BenchShape) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size)
    text = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.llm_hidden, intermediate_size=shape.llm_intermediate,
                       num_hidden_layers=shape.llm_layers, num_attention_heads=shape.llm_heads,
                       max_position_embeddings=4096, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=shape.vocab - 1,
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       image_seq_length=shape.n_visual)


def build_bench_model(shape: BenchShape, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> LlavaForConditionalGeneration:
    return build_random(LlavaForConditionalGeneration, bench_config(shape), dtype, device)


def build_random(model_class: type[torch.nn.Module], config, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> torch.nn.Module:
    """A randomly initialised ``model_class`` (a transformers model) of ``config`` in eval mode."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, where it runs: a 7B model never sits in host memory
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def bench_inputs(shape: BenchShape, batch: int = 1) -> dict[str, torch.Tensor]:
    """``<s> USER : <image>x576 question... ASSISTANT :`` as ids, with a random image."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, shape.vocab - 2, (batch, shape.text_tokens - 3), generator=g)
    image = torch.full((batch, shape.n_visual), shape.vocab - 1)
    ids = torch.cat([torch.ones(batch, 3, dtype=torch.long), image, text], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, shape.image_size, shape.image_size, generator=g)}


def ideal_speedup(config: LlavaConfig, full: TokenCounts, pruned: TokenCounts) -> float:
    """Linear-FLOPs ratio of a prefill that sees ``full`` tokens per block to one that sees
    ``pruned`` (:func:`tokensieve.evaluate.flops.token_counts`)."""
    def linear(counts: TokenCounts) -> int:
        return prefill_flops(config, *counts, attention_scores=False)["total"]

    return linear(full) / linear(pruned)


def speed_benchmark(shape: SpeedShape = BenchShape(), methods: tuple[str | dict, ...] = ("fastv", "divprune"),
                    budgets: tuple[float, ...] = (0.33, 0.22, 0.11), repeats: int = 7, threads: int | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
                    batch: int = 1, new_tokens: int = 8, compile_backend: str | None = None,
                    site: str | None = None, profile: bool = False) -> list[dict]:
    """One row per (method at its default site, or ``site``, budget ratio), each prefill on ``batch`` prompts
    (on a GPU, batch 1 of eager transformers code can be bound by the host launching kernels),
    and ``new_tokens`` (>= 2) generated for the decoding figures; see the module docstring. A method
    is a name or a config ``{"name": ..., key: value}`` (:func:`tokensieve.methods.create_method`).
    profile: each row also gets ``op_profile``, one profiled call of the pruned prefill and of its native
    bound, operator by operator (:func:`tokensieve.evaluate.op_profile.profile_pair`)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = shape.build(dtype, device)
    backbone.processor = question_processor(shape.vocab)  # the question as text, for methods that read it
    native = type(backbone)(hook_free_twin(backbone.model))  # the same weights, never hooked
    inputs = {k: v.to(device) for k, v in shape.inputs(batch).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    sync = synchronizer(device)
    compiled = shape.compiled_modules(backbone)  # all a prefill runs (--compile)

    def prefill():
        backbone.forward(**inputs, logits_to_keep=1)

    rows, encoders = [], {}
    cases = [(m, b) for m in methods for b in budgets]
    for spec, budget in tqdm(cases, desc="speed", unit="case", disable=not progress):
        method = with_clip_encoder(create_method(spec), shape, device, encoders)
        handle = attach(backbone, method, budget, site=site, mode="hard")  # at the method's own site(s) by default
        acted_at = handle.stages[0].site

        def full_prefill():
            with handle.disabled():
                prefill()

        try:
            with compiled_forwards(compiled, compile_backend) if compile_backend else contextlib.nullcontext():
                first = {"pruned": first_call_seconds(prefill, compile_backend)}  # the tokens kept, for the bound
                bound, short_kept = shape.native_bound(handle, backbone, native, inputs)
                variants = {"full": full_prefill, "pruned": prefill,
                            "bound": torch.compile(bound, backend=compile_backend) if compile_backend else bound}
                if compile_backend:  # compile the other two before timing
                    first |= {k: first_call_seconds(variants[k], compile_backend) for k in ("full", "bound")}
                times = alternating_timings(variants, repeats, sync=sync)
            scoring = scoring_shares(prefill, handle, repeats, sync=sync)
            profiled = profile_pair(prefill, variants["bound"], sync, device) if profile else None
            kept = handle.last_counts[str(handle.stages[0])][1]
            ideal = shape.ideal_speedup(backbone, handle)
            decoding = decode_figures(backbone, native, inputs, short_kept, new_tokens, repeats, sync)
        finally:
            handle.detach()
        full, pruned = times["full"], times["pruned"]
        row = {"method": method_label(spec), "site": acted_at, "budget": budget,
               "visual_tokens_kept": kept,
               "prefill_ms_full": round(1000 * statistics.median(full), 2),
               "prefill_ms_pruned": round(1000 * statistics.median(pruned), 2),
               "scoring_overhead": round(statistics.median(scoring), 4),
               "ideal_speedup": round(ideal, 3)}
        row["speedup"] = round(row["prefill_ms_full"] / row["prefill_ms_pruned"], 3)
        row["targets"] = {label: bool(check(row)) for label, check in TARGETS.items()}
        row["native_bound_ms"] = round(1000 * statistics.median(times["bound"]), 2)
        row["ratio_to_bound"] = round(row["native_bound_ms"] / row["prefill_ms_pruned"], 3)
        if isinstance(spec, dict):
            row["params"] = {k: v for k, v in spec.items() if k != "name"}
        if compile_backend:
            row["compile_s"] = {k: round(v, 2) for k, v in first.items()}
        if profiled:
            row["op_profile"] = profiled
        rows.append(row | decoding)
    return rows


def native_llm_reference(shape: SpeedShape, kept_counts: list[int], repeats: int = 7, device: str = "cpu",
                         dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 1) -> list[dict]:
    """What a perfect removal could reach on this machine: the unpruned LLM decoder stack alone
    on random embeddings of the full prompt length vs a natively shorter prompt (``kept`` visual
    tokens, the shape's ``always_kept`` and the text), alternating, medians; no pruning code runs. ``share_of_token_ratio`` is
    the measured speedup over the ratio of lengths (the linear-FLOPs ideal of the LLM part).

    ``tower_ms``: the unpruned vision tower and projector alone on the batch's images, which a
    method acting between them and the LLM still pays; ``projector_site_bound``: the speedup
    of a whole prefill made of that tower and the LLM on the shorter prompt, the most any
    ``projector``-site method could reach here."""
    torch.manual_seed(seed)
    backbone = shape.build(dtype, device)
    llm, sync = shape.language_model(backbone), synchronizer(device)
    inputs = {k: v.to(device) for k, v in shape.inputs(batch).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    tower_s = statistics.median(repeated_timings(lambda: shape.encode(backbone, inputs), repeats, sync=sync))
    full_len = shape.n_visual + shape.text_tokens
    g = torch.Generator().manual_seed(seed)
    out = []
    for kept in kept_counts:
        short_len = kept + shape.always_kept + shape.text_tokens
        full = torch.randn(batch, full_len, shape.llm_hidden, generator=g).to(device, dtype)
        short = full[:, -short_len:].contiguous()
        times = alternate_timings(lambda: llm(inputs_embeds=full), lambda: llm(inputs_embeds=short), repeats,
                                  sync=sync)
        full_s, short_s = statistics.median(times["full"]), statistics.median(times["pruned"])
        out.append({"visual_tokens_kept": kept, "llm_ms_full": round(1000 * full_s, 2),
                    "llm_ms_short": round(1000 * short_s, 2), "speedup": round(full_s / short_s, 3),
                    "token_ratio": round(full_len / short_len, 3),
                    "share_of_token_ratio": round(full_s / short_s * short_len / full_len, 3),
                    "tower_ms": round(1000 * tower_s, 2),
                    "projector_site_bound": round((tower_s + full_s) / (tower_s + short_s), 3)})
    return out


def shape_summary(shape: SpeedShape, device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 1,
                  new_tokens: int = 8, compile_backend: str | None = None) -> dict:
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    return {**asdict(shape), "n_visual": shape.n_visual, "device": where, "dtype": str(dtype).replace("torch.", ""),
            "batch": batch, "new_tokens": new_tokens, "compiled": bool(compile_backend)} | \
        ({"compile_backend": compile_backend} if compile_backend else {})
