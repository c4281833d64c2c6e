"""Token pruning inside CLIP image towers, evaluated by clip_benchmark's own code (pinned 1.6.2).

clip_benchmark has no plugin mechanism. :func:`run_clip_benchmark` hands the arguments to
clip_benchmark's own parser and ``main_eval`` (so every ``clip_benchmark eval`` argument works)
inside :func:`patched_clip_benchmark`, which for the duration of the call only:

* wraps every loader in ``clip_benchmark.models.TYPE2FUNC`` (the table ``load_clip`` reads):
  the original loader runs (or the tiny model's, for ``--model tokensieve-tiny-clip``), then the
  pruning is attached to the image tower it returned, through hooks, before any evaluation;
* wraps ``clip_benchmark.cli.run`` (called once per model x dataset x language) so that after it
  has written its result JSON the pruning settings and the image tokens per block are added
  under ``"tokensieve"``, and the attention record is saved;
* replaces ``clip_benchmark.metrics.zeroshot_classification.accuracy`` by a copy that returns
  the same numbers, only if the original fails on this NumPy: 1.6.2 calls
  ``float(array_of_shape_1)``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
  converted to Python scalars").

Everything is put back on exit; hooks are removed by the handles' ``detach()``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tokensieve.attach import Handle
from tokensieve.backbones.vit_adapters import vit_backbone
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.attention_record import AttentionRecorder
from tokensieve.evaluate.clip_pruning import PruningSettings, attach_pruning, tokens_per_block
from tokensieve.held_warnings import warnings_held_until_success
from tokensieve.optional import ensure_torchvision_importable, import_open_clip, require

CLIP_BENCHMARK_VERSION = "1.6.2"


@dataclass
class EvalRun:
    """One clip_benchmark ``run()``: its arguments, result file and the model it loaded."""

    args: object
    output: Path | None = None
    model: object = None
    backbone: object = None
    handle: Handle | None = None
    recorder: AttentionRecorder | None = None


def load_model(load_func, model_type: str, model_name: str, pretrained: str, cache_dir, device):
    """clip_benchmark's loader contract ``-> (model, transform, tokenizer)``; the tiny CLIP by name.

    A model that cannot be loaded is one line naming it (open_clip reads checkpoint files with
    safetensors or ``torch.load(weights_only=True)``).
    """
    from safetensors import SafetensorError

    from tokensieve.clip.tiny import TINY_NAME, load_tiny

    if model_type == "open_clip" and model_name == TINY_NAME:
        return load_tiny(None if pretrained in ("", "tokensieve") else Path(pretrained), device)
    if model_type == "open_clip" and ":" not in model_name and model_name not in import_open_clip().list_models():
        raise TokensieveError(f"--model {model_name!r} is no open_clip model (open_clip.list_models() names them; "
                              f"{TINY_NAME} is the shipped tiny one)")
    try:
        with warnings_held_until_success():
            return load_func(model_name=model_name, pretrained=pretrained, cache_dir=cache_dir, device=device)
    except (pickle.UnpicklingError, EOFError, KeyError):  # what torch's weights-only unpickler raises
        raise TokensieveError(f"cannot load --model {model_name} --pretrained {pretrained}: not a plain file of "
                              "tensors (empty, corrupt, or holding pickled objects, which "
                              "torch.load(weights_only=True) refuses to run)") from None
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        text = " ".join(str(err).split()) or type(err).__name__  # open_clip's messages span lines
        raise TokensieveError(f"cannot load --model {model_name} --pretrained {pretrained}: {text[:300]}") from None


def output_path(args) -> Path:
    """The result file clip_benchmark 1.6.2's ``run(args)`` writes (its own naming rule)."""
    from clip_benchmark.datasets.builder import get_dataset_default_task

    name = args.dataset.replace("wds/", "", 1) if args.dataset.startswith("wds/") else args.dataset
    task = get_dataset_default_task(name) if args.task == "auto" else args.task
    is_file = os.path.isfile(args.pretrained)
    return Path(args.output.format(
        model=args.model, pretrained=os.path.basename(args.pretrained) if is_file else args.pretrained,
        pretrained_full_path=args.pretrained.replace("/", "_") if is_file else args.pretrained,
        task=task, dataset=name.replace("/", "_"), language=args.language))


def check_dataset_root(args) -> None:
    """Refuse a local ``wds/`` dataset whose folder lacks the split's ``nshards.txt`` before the
    model is loaded (clip_benchmark would fail after loading it, with a traceback)."""
    if not args.dataset.startswith("wds/"):
        return
    name = args.dataset.replace("wds/", "", 1)
    root = args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
    if "://" not in root and not (Path(root) / args.split / "nshards.txt").is_file():
        raise TokensieveError(f"--dataset {args.dataset}: no webdataset at {root} (it needs {args.split}/nshards.txt);"
                              " check --dataset_root")


def write_json(path: Path, obj: dict) -> None:
    """Replace ``path`` atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _accuracy_numpy2(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip_benchmark 1.6.2's ``accuracy`` with the scalar taken by ``.item()`` (same numbers)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _accuracy_needs_fix(accuracy) -> bool:
    try:
        accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
        return False
    except TypeError:
        return True


class ClipBenchmarkSession:
    """The state of one ``tokensieve clip-benchmark`` call: settings and the runs made."""

    def __init__(self, settings: PruningSettings, keep_models: bool = False):
        self.settings, self.keep_models = settings, keep_models
        self.runs: list[EvalRun] = []
        self.workarounds: list[str] = []

    def loader(self, model_type: str, original):
        def load(model_name, pretrained, cache_dir=None, device="cpu"):
            model, transform, tokenizer = load_model(original, model_type, model_name, pretrained, cache_dir, device)
            run = self.runs[-1]
            run.model = model
            try:
                run.backbone = vit_backbone(model)
            except TokensieveError:
                if self.settings.enable_pruning or self.settings.extract_attention:
                    raise
                return model, transform, tokenizer  # an unpruned run of another model: evaluated as is
            if self.settings.enable_pruning:
                run.handle = attach_pruning(run.backbone, self.settings)
            if self.settings.extract_attention:
                run.recorder = AttentionRecorder(run.backbone, run.handle)
            return model, transform, tokenizer
        return load

    def run(self, original):
        def run(args):
            self.runs.append(EvalRun(args))
            self._cap_workers(args)
            check_dataset_root(args)
            try:
                output_path(args).parent.mkdir(parents=True, exist_ok=True)  # clip_benchmark does not create it
            except OSError as err:
                raise TokensieveError(f"--output {output_path(args)}: cannot make the folder it goes in "
                                      f"({err.strerror}: {err.filename})") from None
            try:
                result = original(args)
            except BaseException:
                self.release(self.runs[-1])
                raise
            current = self.runs[-1]
            if current.model is not None:  # not skipped as existing
                current.output = output_path(args)
                self._annotate(current)
                if not self.keep_models:
                    self.release(current)
            return result
        return run

    def _cap_workers(self, args) -> None:
        """At most one loader worker per shard of a local wds set: webdataset gives an extra worker
        no shard and clip_benchmark then stops with "No samples found in dataset" (its default is 4
        workers; ``write-data`` writes 3 shards)."""
        if not args.dataset.startswith("wds/"):
            return
        name = args.dataset.replace("wds/", "", 1)
        nshards = Path(args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-")),
                       args.split, "nshards.txt")
        if not nshards.is_file():
            return  # a remote set, or none: clip_benchmark reports it
        shards = int(nshards.read_text().strip() or 0)
        if 0 < shards < args.num_workers:
            self.workarounds.append(f"num_workers {args.num_workers} -> {shards}: {name} has {shards} shards, and "
                                    "clip_benchmark finds no samples with more workers than shards")
            args.num_workers = shards

    def _annotate(self, run: EvalRun) -> None:
        from importlib.metadata import version

        tower = {} if run.backbone is None else {
            "image_tokens_per_block": tokens_per_block(run.backbone, run.handle),
            "patch_tokens": run.backbone.n_patches, "blocks": run.backbone.depth}
        info = {"pruning": self.settings.record(run.backbone), **tower,
                "measured_counts": dict(run.handle.last_counts) if run.handle else {},
                "versions": {"tokensieve": version("tokensieve"), "clip_benchmark": version("clip_benchmark"),
                             "open_clip_torch": version("open_clip_torch"), "torch": torch.__version__},
                "workarounds": self.workarounds, "command": " ".join(sys.argv)}
        if run.recorder is not None:
            path = Path(self.attention_path(run))
            run.recorder.save(path, {"settings": asdict(self.settings), "image_tokens_per_block":
                                     info["image_tokens_per_block"]})
            info["attention_output"] = str(path)
        if not run.output.is_file():
            raise TokensieveError(f"clip_benchmark did not write {run.output}; cannot add the pruning record")
        result = json.loads(run.output.read_text())
        result["tokensieve"] = info
        write_json(run.output, result)

    def attention_path(self, run: EvalRun) -> str:
        if self.settings.attention_output:
            args = run.args
            return self.settings.attention_output.format(model=args.model, dataset=args.dataset.replace("/", "_"),
                                                         language=args.language, pretrained=os.path.basename(
                                                             args.pretrained), task=args.task)
        return str(output_path(run.args).with_suffix("")) + "_attention.pt"

    @staticmethod
    def release(run: EvalRun) -> None:
        for part in (run.recorder, run.handle):
            if part is not None:
                part.detach()

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """clip_benchmark's loader table, ``run`` and (if broken here) ``accuracy``, wrapped for this call."""
        from clip_benchmark import cli, models
        from clip_benchmark.metrics import zeroshot_classification

        saved_types, saved_run = dict(models.TYPE2FUNC), cli.run
        saved_accuracy = zeroshot_classification.accuracy
        try:
            for name, func in saved_types.items():
                models.TYPE2FUNC[name] = self.loader(name, func)
            cli.run = self.run(saved_run)
            if _accuracy_needs_fix(saved_accuracy):
                zeroshot_classification.accuracy = _accuracy_numpy2
                self.workarounds.append("clip_benchmark.metrics.zeroshot_classification.accuracy replaced for this "
                                        "run by a copy using .item() (1.6.2 calls float() on a 1-element array, "
                                        "which NumPy >= 2.4 refuses)")
            yield
        finally:
            models.TYPE2FUNC.clear()
            models.TYPE2FUNC.update(saved_types)
            cli.run = saved_run
            zeroshot_classification.accuracy = saved_accuracy


def run_clip_benchmark(clip_benchmark_args: list[str], settings: PruningSettings,
                       keep_models: bool = False) -> ClipBenchmarkSession:
    """``clip_benchmark eval ARGS`` with ``settings`` applied; returns the session (its runs)."""
    settings.validate()
    ensure_torchvision_importable()
    cli = require("clip_benchmark.cli", "clip")
    session = ClipBenchmarkSession(settings, keep_models)
    argv, usage = sys.argv, io.StringIO()
    sys.argv = ["clip_benchmark", "eval", *clip_benchmark_args]  # clip_benchmark's parser reads sys.argv
    try:
        with contextlib.redirect_stderr(usage):
            _parser, base = cli.get_parser_args()
    except SystemExit as exit_:
        if exit_.code:  # a usage error: its last line says what (the usage above it, many lines, is left out)
            last = usage.getvalue().strip().splitlines()[-1]
            raise TokensieveError(f"clip_benchmark eval: {last.split('error: ', 1)[-1]}") from None
        raise
    finally:
        sys.argv = argv
    with session.patched():
        cli.main_eval(base)
    return session
