"""The integrations are extras: a base install imports none of their libraries, and a missing
one is a single line naming the extra that brings it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokensieve.cli import main
from tokensieve.distributed import Distributed
from tokensieve.errors import TokensieveError
from tokensieve.optional import require

# Every library of an extra that a base install lacks.
OPTIONAL = ("optuna", "open_clip", "clip_benchmark", "webdataset", "accelerate", "torchvision", "tensorboard",
            "lmms_eval")


def _in_fresh_python(code: str) -> dict:
    """What ``code`` prints as its last line, read as JSON, run in a new interpreter."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_tokensieve_loads_no_optional_library_and_leaves_torchvisions_operators_alone():
    loaded = _in_fresh_python(f"""
import json, sys, torch
import tokensieve
print(json.dumps({{"loaded": [m for m in {OPTIONAL!r} if m in sys.modules],
                   "nms": len(torch._C._jit_get_schemas_for_operator("torchvision::nms"))}}))
""")
    assert loaded == {"loaded": [], "nms": 0}


def test_the_demo_and_the_cli_import_with_every_optional_library_missing():
    # None in sys.modules is how Python marks a module as absent: importing it raises, and
    # transformers' availability checks (importlib.util.find_spec) see it as not installed.
    loaded = _in_fresh_python(f"""
import json, sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
import tokensieve, tokensieve.demo, tokensieve.cli
from tokensieve.cli import build_parser
build_parser()  # every subcommand's parser, clip-benchmark's included
print(json.dumps([m for m in {OPTIONAL!r} if sys.modules.get(m) is not None]))
""")
    assert loaded == []


@pytest.mark.parametrize("module,extra,message", [
    ("optuna", "search", "tokensieve search needs optuna: pip install 'tokensieve[search]'"),
    ("open_clip", "clip", "CLIP ViT pruning needs open-clip-torch: pip install 'tokensieve[clip]'"),
    ("clip_benchmark.cli", "clip", "CLIP ViT pruning needs clip-benchmark: pip install 'tokensieve[clip]'"),
    ("accelerate", "dist", "a run in several processes needs accelerate: pip install 'tokensieve[dist]'"),
    ("lmms_eval", "lmms", "the tokensieve lmms-eval model needs lmms-eval: pip install 'tokensieve[lmms]'"),
])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, module, extra, message):
    monkeypatch.delitem(sys.modules, module, raising=False)  # a submodule imported before
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)
    with pytest.raises(TokensieveError) as err:
        require(module, extra)
    assert str(err.value) == message


def test_a_module_missing_outside_the_extra_is_not_blamed_on_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ModuleNotFoundError):
        require("yaml", "search")


def test_tokensieve_search_without_optuna_says_which_extra_and_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)
    search_file = Path(__file__).parents[1] / "configs" / "search_testbed.yaml"
    assert main(["search", str(search_file), "--trials", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "tokensieve: error: tokensieve search needs optuna: pip install 'tokensieve[search]'\n"


def test_several_processes_without_accelerate_say_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TokensieveError, match=r"pip install 'tokensieve\[dist\]'"):
        Distributed()


def test_training_without_tensorboard_writes_its_log_and_no_events(monkeypatch, tiny_llava_dir, tmp_path):
    from tiny_two_stage import tiny_config

    from tokensieve.train.trainer import train_two_stage

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    train_two_stage(tiny_config(tiny_llava_dir), out, progress=False)
    assert (out / "done.json").is_file() and (out / "log.jsonl").read_text() and not (out / "tb").exists()
