"""CLIP side of tokensieve: the tiny open_clip model trained on synthetic shapes, and its data sets in
clip_benchmark's ``wds`` layout."""
