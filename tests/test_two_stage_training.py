"""The learned two-stage pruner: gradients reach only its parts, soft key masks learn, runs
resume exactly, trained parts load for evaluation, and bad settings are named."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from tiny_two_stage import step_leaving_the_backbone_alone, tiny_config

from tokensieve.attach import attach
from tokensieve.backbones.llava_prompt import encode
from tokensieve.cli import main
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs
from tokensieve.pruner import TwoStagePruner
from tokensieve.train.trainer import TwoStageTrainer, train_two_stage


@pytest.fixture(scope="module")
def finished_run(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "uninterrupted"
    train_two_stage(tiny_config(tiny_llava_dir), out, progress=False)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_only_the_trainable_parts_get_gradients(tiny_llava_dir, tmp_path, dtype):
    # bfloat16: a half-precision backbone (as LLaVA-7B is trained) with the parts in float32.
    cfg = tiny_config(tiny_llava_dir, discriminator={"enabled": True, "d_internal": 16, "layers": [-1, -2, -3]},
                      loss={"adversarial": 0.1, "hidden_mse": 0.1}, run={"dtype": dtype})
    trainer = TwoStageTrainer(cfg, tmp_path / "run", progress=False)
    assert trainer.backbone.model.dtype == getattr(torch, dtype)
    row = step_leaving_the_backbone_alone(trainer)
    assert {"task", "distill", "sparsity", "merge_sparsity", "hidden_mse", "adversarial", "discriminator",
            "disc_prob_real", "disc_prob_fake"} <= set(row)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if isinstance(v, float))
    for part in (trainer.parts.token_merger, trainer.parts.layer_pruners, trainer.parts.discriminator):
        assert all(p.dtype == torch.float32 for p in part.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


@pytest.mark.parametrize("gate", ["values", "keys"])
def test_the_task_loss_alone_reaches_the_merger_scorer_through_either_gate(tiny_llava_dir, tmp_path, gate):
    # No pruner heads: with the gate on the keys, the LLM must still be hooked from layer 0.
    cfg = tiny_config(tiny_llava_dir, merger={"gate": gate}, pruner={"enabled": False},
                      loss={"distill": 0.0, "sparsity": 0.0, "merge_sparsity": 0.0})
    trainer = TwoStageTrainer(cfg, tmp_path / "run", progress=False)
    trainer.parts.train()
    handle = trainer.parts.attach(trainer.backbone, "soft", training=True)
    try:
        trainer.train_step(handle)
    finally:
        handle.detach()
    scorer_out = trainer.parts.token_merger.scorer[-1].weight
    assert scorer_out.grad is not None and scorer_out.grad.abs().sum() > 0
    # Gated keys leave the centres' values as merged; gated values leave no key mask.
    assert handle.stages[0].method.gates_keys == (gate == "keys")


@dataclass
class FixedKeyMask(Method):
    """Keeps every token and weights them by a fixed differentiable mask (test only)."""

    name = "fixed_key_mask"
    stages = ("llm",)
    mask: torch.Tensor | None = None

    def select(self, inputs: SiteInputs) -> Selection:
        b, n = inputs.tokens.shape[:2]
        return Selection(torch.arange(n).expand(b, n), key_mask=self.mask.expand(b, n))


@dataclass
class KeepIndices(Method):
    """Keeps the same tokens in every row (test only)."""

    name = "keep_indices"
    stages = ("llm",)
    indices: torch.Tensor | None = None

    def select(self, inputs: SiteInputs) -> Selection:
        return Selection(self.indices.expand(inputs.tokens.shape[0], -1))


def test_a_soft_key_mask_removes_tokens_and_passes_gradients_through_the_dropped_ones(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:1])
    n = backbone.n_visual_tokens
    values = torch.ones(n)
    values[::3] = 0.0
    mask = values.clone().requires_grad_(True)
    handle = attach(backbone, FixedKeyMask(mask=mask), 1.0, site="llm.1", mode="soft")
    try:
        soft = backbone.forward(**batch).logits[:, -1]
    finally:
        handle.detach()
    kept = values.nonzero().flatten()
    handle = attach(backbone, KeepIndices(indices=kept), len(kept), site="llm.1", mode="hard")
    try:
        hard = backbone.forward(**batch).logits[:, -1]
    finally:
        handle.detach()
    torch.testing.assert_close(soft, hard, atol=1e-4, rtol=1e-4)
    soft.logsumexp(-1).sum().backward()
    assert mask.grad[values == 0].abs().sum() > 0  # dropped tokens still tell the mask what they were worth


@dataclass
class KeyWeighted(Method):
    """Keeps every token before the LLM, weighted as keys by a mask; with ``noise_seed`` the
    even tokens' contents are replaced by seeded noise (test only)."""

    name = "key_weighted"
    stages = ("projector", "vision")
    mask: torch.Tensor | None = None
    noise_seed: int | None = None

    def select(self, inputs: SiteInputs) -> Selection:
        b, n = inputs.tokens.shape[:2]
        tokens = None
        if self.noise_seed is not None:
            tokens = inputs.tokens.clone()
            noise = torch.randn(tokens[:, ::2].shape, generator=torch.Generator().manual_seed(self.noise_seed))
            tokens[:, ::2] = 10 * noise
        return Selection(torch.arange(n).expand(b, n), tokens, self.mask.expand(b, n))


def _key_weighted_logits(backbone, batch, mask, noise_seed=None, site="projector"):
    handle = attach(backbone, KeyWeighted(mask=mask, noise_seed=noise_seed), 1.0, site=site, mode="soft")
    try:
        return backbone.forward(**batch).logits[:, -1]
    finally:
        handle.detach()


def test_a_projector_key_mask_weights_the_tokens_as_keys_in_every_llm_layer(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:1])
    n = backbone.n_visual_tokens
    with torch.no_grad():
        reference = backbone.forward(**batch).logits[:, -1]
    ones = torch.ones(n, requires_grad=True)
    weighted = _key_weighted_logits(backbone, batch, ones)
    torch.testing.assert_close(weighted, reference, atol=1e-5, rtol=1e-5)  # weight 1 = no mask
    weighted.logsumexp(-1).sum().backward()
    assert ones.grad.abs().sum() > 0  # the gradient a straight-through gate learns from
    # Tokens of weight 0 are invisible to every later token: their contents no longer matter.
    hidden = torch.ones(n)
    hidden[::2] = 0.0
    with torch.no_grad():
        a = _key_weighted_logits(backbone, batch, hidden, noise_seed=0)
        b = _key_weighted_logits(backbone, batch, hidden, noise_seed=1)
        seen = _key_weighted_logits(backbone, batch, torch.ones(n), noise_seed=0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(seen, reference, atol=1e-3)  # the noise would matter if it were seen


def test_a_key_mask_inside_the_vision_tower_is_refused(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:1])
    with pytest.raises(TokensieveError, match="only supported at the projector and inside the LLM"):
        _key_weighted_logits(backbone, batch, torch.ones(backbone.n_patches), site="vision.1")


def test_an_interrupted_run_resumes_to_the_same_parts(tiny_llava_dir, tmp_path, finished_run, monkeypatch):
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    original = TwoStageTrainer.train_step

    def stop_after_three(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(TwoStageTrainer, "train_step", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        train_two_stage(tiny_config(tiny_llava_dir), out, progress=False)
    assert not (out / "done.json").exists()
    monkeypatch.setattr(TwoStageTrainer, "train_step", original)
    with pytest.raises(TokensieveError, match="--resume"):
        train_two_stage(tiny_config(tiny_llava_dir), out, progress=False)
    train_two_stage(tiny_config(tiny_llava_dir), out, resume=True, progress=False)
    resumed, straight = load_file(out / "parts.safetensors"), load_file(finished_run / "parts.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_each_group_steps_at_its_configured_rate_times_the_schedule(tiny_llava_dir, tmp_path):
    cfg = tiny_config(tiny_llava_dir, optim={"lr_schedule": "cosine", "lr_floor": 0.2, "lr_token_merger": 0.01,
                                             "lr_layer_pruners": 0.02})
    trainer = TwoStageTrainer(cfg, tmp_path / "run", progress=False)
    handle = trainer.parts.attach(trainer.backbone, "soft", training=True)
    try:
        for _ in range(3):
            trainer.train_step(handle)
    finally:
        handle.detach()
    factor = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 2 / 4))  # the third of four steps
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups} == pytest.approx(
        {"token_merger": 0.01 * factor, "layer_pruners": 0.02 * factor})


def test_each_step_draws_its_merge_budget_from_the_range_the_same_way_every_time(tiny_llava_dir, backbone):
    parts = TwoStagePruner(tiny_config(tiny_llava_dir), backbone)
    draws = [parts.training_centres(step) for step in range(20)]
    assert draws == [parts.training_centres(step) for step in range(20)]  # a resumed run replays them
    assert all(16 <= d <= 48 for d in draws) and len(set(draws)) > 5  # 0.25 .. 0.75 of 64 patches
    fixed = TwoStagePruner(tiny_config(tiny_llava_dir, merger={"train_merge_range": None}), backbone)
    assert {fixed.training_centres(step) for step in range(5)} == {32}


def test_validation_scores_both_ends_of_the_trained_merge_range(tiny_llava_dir, tmp_path, monkeypatch):
    trainer = TwoStageTrainer(tiny_config(tiny_llava_dir), tmp_path / "run", progress=False)
    assert trainer.parts.validation_centres() == [16, 48]  # 0.25 and 0.75 of 64 patches
    seen = []

    def validate_at(centres):
        seen.append((centres, trainer.parts.validation_centres()))
        return {16: 0.5, 48: 1.0}[centres]

    monkeypatch.setattr(trainer, "_validate_at", validate_at)
    assert trainer.validate() == 0.75 and [c for c, _ in seen] == [16, 48]
    assert trainer.last_validation == {16: 0.5, 48: 1.0}  # logged as val_accuracy_at_16 / _48
    fixed = TwoStagePruner(tiny_config(tiny_llava_dir, merger={"train_merge_range": None}), trainer.backbone)
    assert fixed.validation_centres() == [32]


def test_validating_at_a_budget_changes_what_the_merger_keeps(tiny_llava_dir, tmp_path):
    trainer = TwoStageTrainer(tiny_config(tiny_llava_dir), tmp_path / "run", progress=False)
    counts = []
    original = trainer.parts.attach

    def attach_and_watch(*args, **kwargs):
        handle = original(*args, **kwargs)
        counts.append(handle)
        return handle

    trainer.parts.attach = attach_and_watch
    assert 0 <= trainer._validate_at(8) <= 1
    assert counts[0].last_counts[str(counts[0].stages[0])][1] == 8  # the merger's 8 centres entered the LLM


def test_a_run_folder_holds_config_best_and_logs(finished_run):
    assert (finished_run / "best" / "parts.safetensors").is_file()
    assert (finished_run / "config.yaml").is_file() and (finished_run / "tb").is_dir()
    last = json.loads((finished_run / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss", "task", "distill", "sparsity", "tau", "keep_ratio", "val_accuracy"} <= set(last)
    assert not any(k.startswith("model.") for k in load_file(finished_run / "parts.safetensors"))


def test_trained_parts_evaluate_in_hard_mode_at_their_budget_and_at_others(finished_run, tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--pruner", str(finished_run), "--centres", "0.25,24",
                 "--samples", "10", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    learned = [r for r in rows if r["method"] == "two_stage"]
    assert [r["visual_tokens_kept"] for r in learned] == [16, 24]
    # of the 16 tokens entering the LLM, the head at llm.1 keeps sqrt(0.5) (11), the one at llm.2 half (8)
    per_layer = learned[0]["tokens_per_llm_layer"]
    assert (per_layer[0] - per_layer[1], per_layer[0] - per_layer[2]) == (16 - 11, 16 - 8)


def test_the_trained_parts_are_compared_pairwise_with_each_method_at_their_budget(finished_run, tiny_llava_dir,
                                                                                   capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--pruner", str(finished_run), "--centres", "0.25",
                 "--budget", "0.25", "--method", "random,visionzip", "--oracle", "--samples", "10", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    learned = next(r for r in rows if r["method"] == "two_stage")
    by_name = {f"{r['method']}@{r['site']}": r for r in rows if r["method"] not in ("none", "two_stage")}
    assert [p["against"] for p in learned["paired"]] == list(by_name)
    for p in learned["paired"]:
        # right/wrong answers: the accuracy difference is (items better - items worse) / items
        assert p["difference"] == pytest.approx(learned["accuracy"] - by_name[p["against"]]["accuracy"], abs=1e-3)
        assert p["difference"] == pytest.approx((p["better"] - p["worse"]) / 10, abs=1e-3)
        assert 0 < p["p_value"] <= 1
    # the head in the LLM cuts further, so the two-stage row costs less than every method at its budget
    for other in by_name.values():
        assert learned["flops"]["total"] <= other["flops"]["total"]
        at_cost = other["two_stage_at_cost"]
        assert (at_cost["budget"], at_cost["accuracy"]) == ("0.25", learned["accuracy"])
        assert at_cost["difference"] == pytest.approx(learned["accuracy"] - other["accuracy"], abs=1e-3)


def test_methods_are_matched_to_the_trained_parts_at_each_centres_value(finished_run, tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--pruner", str(finished_run), "--centres", "0.25",
                 "--method", "random", "--match", "tokens", "--samples", "10", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    learned = next(r for r in rows if r["method"] == "two_stage")
    other = next(r for r in rows if r["method"] == "random")
    assert learned["budget"] == "0.25" and learned["visual_tokens_kept"] == 16
    assert other["matched"]["to"] == "0.25"
    assert other["matched"]["target"] == pytest.approx(learned["visual_tokens_mean_llm"], abs=0.01)
    assert [p["against"] for p in learned["paired"]] == [f"random@{other['site']}"]


def test_eval_with_a_head_threshold_lets_each_head_keep_a_count_per_row(finished_run, tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--pruner", str(finished_run), "--centres", "0.25",
                 "--head-threshold", "0.5", "--samples", "10", "--json"]) == 0
    learned = next(r for r in json.loads(capsys.readouterr().out) if r["method"] == "two_stage")
    per_stage = learned["visual_tokens_per_stage"]
    assert list(per_stage) == ["token_merger@projector:16", "layer_pruner@llm.1:1.0", "layer_pruner@llm.2:1.0"]
    merger, first, second = per_stage.values()
    assert merger == 16 and 1 <= second <= first <= 16
    per_layer = learned["tokens_per_llm_layer"]  # the FLOPs count each head's mean, rounded
    assert (per_layer[0] - per_layer[1], per_layer[0] - per_layer[2]) == (16 - round(first), 16 - round(second))


def test_eval_with_a_head_share_sets_what_the_heads_keep(finished_run, tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--pruner", str(finished_run), "--centres", "0.25",
                 "--head-share", "0.125", "--samples", "10", "--json"]) == 0
    learned = next(r for r in json.loads(capsys.readouterr().out) if r["method"] == "two_stage")
    # of the 16 tokens entering the LLM, the head at llm.1 keeps sqrt(0.125) (6), the one at llm.2 an eighth (2)
    assert list(learned["visual_tokens_per_stage"].values()) == [16, 6, 2]


@pytest.mark.parametrize("flags,message", [
    (["--method", "random", "--budget", "8", "--head-threshold", "0.5"], "--head-threshold 0.5: give it with --pruner"),
    (["--pruner", "RUN", "--head-threshold", "1.5"], "--head-threshold 1.5: give it with --pruner, in [0, 1)"),
    (["--pruner", "RUN", "--head-share", "0"], "--head-share 0.0: give it with --pruner, in (0, 1]"),
    (["--pruner", "RUN", "--head-share", "0.5", "--head-threshold", "0.5"], "give one of them"),
])
def test_head_settings_need_a_pruner_and_a_sensible_value(tiny_llava_dir, finished_run, capsys, flags, message):
    flags = [str(finished_run) if flag == "RUN" else flag for flag in flags]
    assert main(["eval", "--model", str(tiny_llava_dir), *flags]) != 0
    assert message in capsys.readouterr().err


def test_loaded_parts_are_the_saved_ones(finished_run, backbone):
    parts = TwoStagePruner.from_pretrained(finished_run, backbone)
    saved = load_file(finished_run / "best" / "parts.safetensors")
    assert all(torch.equal(parts.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("sections,message", [
    ({"pruner": {"pruning_layers": [5]}}, "beyond this LLM"),
    ({"merger": {"merge_ratio": 1.5}}, "not in \\(0, 1\\]"),
    ({"merger": {"train_merge_range": [0.5, 0.2]}}, "train_merge_range \\[0.5, 0.2\\] must be \\[low, high\\]"),
    ({"merger": {"target_merge_tokens": 1000}}, "1000 is not between 1 and"),
    ({"merger": {"diversity_radius": 0.0}}, "diversity_radius 0.0 must be > 0"),
    ({"merger": {"diversity": 0.0}}, "merger.diversity is 0"),  # the tiny settings set a radius
    ({"pruner": {"keep_threshold": 1.0}}, "pruner.keep_threshold 1.0 must be in \\[0, 1\\)"),
    ({"merger": {"enabled": False}, "pruner": {"enabled": False}}, "nothing to train"),
    ({"discriminator": {"enabled": True, "layers": [-1, -9]}}, "do not exist"),
])
def test_bad_settings_are_named_before_any_training(tiny_llava_dir, tmp_path, sections, message):
    with pytest.raises(TokensieveError, match=message):
        train_two_stage(tiny_config(tiny_llava_dir, **sections), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # not even an empty run folder is left behind


def test_resuming_with_a_different_config_is_refused(tiny_llava_dir, finished_run):
    changed = tiny_config(tiny_llava_dir, optim={"lr_layer_pruners": 5e-3})
    with pytest.raises(TokensieveError, match="optim.lr_layer_pruners"):
        train_two_stage(changed, finished_run, resume=True, progress=False)


def test_a_corrupt_state_file_is_named(tiny_llava_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_llava_dir)
    TwoStageTrainer(cfg, out, progress=False)  # writes the config
    (out / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TokensieveError, match="cannot resume from .*state.pt"):
        TwoStageTrainer(cfg, out, resume=True, progress=False)


def test_train_cli_reads_yaml_and_overrides_and_names_unknown_keys(tiny_llava_dir, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {tiny_llava_dir}\nmerger:\n  merge_ratoi: 0.5\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "merger.merge_ratoi" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_question_aware_merger_treats_each_sample_alone(backbone, tiny_samples, mode):
    handle = attach(backbone, {"name": "token_merger", "variant": "question_aware"}, 16, mode=mode)
    try:
        together = backbone.forward(**encode(backbone.processor, tiny_samples), logits_to_keep=1).logits[:, -1]
        alone = torch.cat([backbone.forward(**encode(backbone.processor, [s]), logits_to_keep=1).logits[:, -1]
                           for s in tiny_samples])
    finally:
        handle.detach()
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)


@dataclass
class RecordQuestion(Method):
    """Keeps everything and records the question it was shown (test only)."""

    name = "record_question"
    stages = ("projector", "llm")
    seen: list | None = None

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen.append(inputs.question())
        b, n = inputs.tokens.shape[:2]
        return Selection(torch.arange(n).expand(b, n))


@pytest.mark.parametrize("site", ["projector", "llm.1"])
def test_methods_never_see_the_answer_or_anything_after_it(backbone, site):
    from tokensieve.data.instruct import collate, synthetic_examples
    from tokensieve.data.synthetic_eval import scene_spec_for
    from tokensieve.train.trainer import after_first_answer

    batch = collate(backbone.processor, synthetic_examples(3, 0, 4, scene_spec_for(backbone)), label_eos=False)
    method = RecordQuestion(seen=[])
    handle = attach(backbone, method, 1.0, site=site, mode="hard")
    try:
        backbone.forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                         answer_mask=after_first_answer(batch["labels"]))
    finally:
        handle.detach()
    _, valid = method.seen[0]
    tok = backbone.processor.tokenizer
    for row, ids in zip(valid, batch["input_ids"]):
        shown = tok.convert_ids_to_tokens(ids[len(ids) - len(row):][row].tolist())
        assert shown[-2:] == ["ASSISTANT", ":"]  # the question and the answer cue, no answer, no </s>
