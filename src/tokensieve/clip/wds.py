"""Write the synthetic shape sets in clip_benchmark's local ``wds`` layout.

``write_shape_datasets(out)`` creates::

    out/shapes_classification/  classnames.txt, zeroshot_classification_templates.txt,
                                test/nshards.txt, test/0.tar ...   (one-object images, .png + .cls)
    out/shapes_retrieval/       dataset_type.txt ("retrieval"),
                                test/nshards.txt, test/0.tar ...   (two-object images, .png + .txt caption)

so ``clip_benchmark eval --dataset wds/shapes_classification --dataset_root 'out/{dataset}'`` reads
them (clip_benchmark 1.6.2 ``build_wds_dataset``; ``{dataset}`` is the name after ``wds/``). Images are held out from training (their own
seeds); the same arguments always write the same bytes.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from tokensieve.clip.shapes import CLASSNAMES, SEEDS, TEMPLATES, shape_image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(folder: Path, records: Iterator[dict[str, bytes]], count: int, per_shard: int) -> None:
    """``records`` yields ``{extension: bytes}`` per sample; written as ``folder/{k}.tar`` shards."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = (count + per_shard - 1) // per_shard
    for k in range(shards):
        with tarfile.open(folder / f"{k}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(k * per_shard, min(count, (k + 1) * per_shard)):
                for ext, data in next(records).items():
                    _add(tar, f"{i:06d}.{ext}", data)
    (folder / "nshards.txt").write_text(f"{shards}\n")


def write_shape_datasets(out: Path, classification_images: int = 540, retrieval_images: int = 300,
                         per_shard: int = 256) -> dict[str, Path]:
    """Write both sets under ``out``; returns ``{dataset name: folder}`` (replacing old copies)."""
    roots = {"wds/shapes_classification": Path(out) / "shapes_classification",
             "wds/shapes_retrieval": Path(out) / "shapes_retrieval"}
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)

    root = roots["wds/shapes_classification"]
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    items = (shape_image(SEEDS["classification"], i) for i in range(classification_images))
    _write_shards(root / "test", ({"png": _png(it.image), "cls": str(it.label).encode()} for it in items),
                  classification_images, per_shard)

    root = roots["wds/shapes_retrieval"]
    root.mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    items = (shape_image(SEEDS["retrieval"], i, n_objects=2) for i in range(retrieval_images))
    _write_shards(root / "test", ({"png": _png(it.image), "txt": it.caption().encode()} for it in items),
                  retrieval_images, per_shard)
    return roots
