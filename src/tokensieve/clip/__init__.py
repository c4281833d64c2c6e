"""CLIP side of tokensieve: the tiny open_clip model trained on synthetic shapes, its data sets in
clip_benchmark's ``wds`` layout, and the import shims the CLIP libraries need here."""
