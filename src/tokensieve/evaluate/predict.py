"""Greedy answers of a LLaVA or Qwen-VL backbone to questions about images, in batches."""

from __future__ import annotations

import torch
from tqdm import tqdm

from tokensieve.backbones.chat_format import encode_samples
from tokensieve.data.synthetic_eval import KeptFn


@torch.no_grad()
def predict(backbone, samples: list, kept: KeptFn | None = None,
            batch_size: int = 64, desc: str | None = None, max_new_tokens: int = 1) -> list[str]:
    """Greedy answers to ``samples`` (anything with ``image`` and ``question``), decoded.

    max_new_tokens: 1 takes the argmax over the whole vocabulary at the answer slot (one prefill,
    the testbed's one-word answers); more generates up to that many tokens with the KV cache.
    kept: optional per-sample indices of the visual tokens that enter the LLM (one image each).
    """
    tok = backbone.processor.tokenizer
    out: list[str] = []
    starts = range(0, len(samples), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=desc is None, leave=False):
        chunk = samples[i : i + batch_size]
        rows_kept = [kept(s) for s in chunk] if kept else None
        batch = encode_samples(backbone, chunk)
        if max_new_tokens == 1:
            ids = backbone.forward(**batch, kept=rows_kept, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None]
        else:
            ids = backbone.generate(**batch, kept=rows_kept, max_new_tokens=max_new_tokens, do_sample=False)
        out.extend(text.strip() for text in tok.batch_decode(ids, skip_special_tokens=True))
    return out
