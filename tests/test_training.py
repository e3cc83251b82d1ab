"""Head training end to end on a few prompts: sampling, features, value head and ARM.

Runs the real base model, so it is kept tiny (4 prompts x 2 samples x 12 tokens, the rule-based
``concise`` reward); the cached samples are shared by every test in the module.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from alignserve.value_models.heads import ARMHead, QHead, ValueHead, load_head
from alignserve.value_models.lexical import LexicalARM
from alignserve.value_models.training import TrainConfig, run_training


def _cfg(run_dir: Path, out: Path, kind: str, **kw) -> TrainConfig:
    base = dict(kind=kind, reward="concise=1", out=str(out), suite="mixed", prompts=4,
                val_prompts=2, samples=2, max_new_tokens=12, seed=3, run_dir=str(run_dir),
                progress=False, command="pytest")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dir) -> Path:
    return tmp_path_factory.mktemp("train")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_value_head_learns_and_loads(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "concise_value"
    head = run_training(_cfg(run_dir, out, "value", method="fudge", epochs=40, lr=3e-3))
    hist = head.manifest["training"]["history"]
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"], hist
    loaded = load_head(out)
    assert loaded.name == "concise_value" and loaded.kind == "value"
    assert isinstance(loaded.module, ValueHead)
    assert _same(loaded.module, head.module)
    m = loaded.manifest
    assert m["placement"] == "base" and m["arch"]["dim"] == 576 and m["arch"]["hidden"] == 128
    assert m["tokenizer"].startswith("vocab-") and m["reward"] == "concise=1"
    assert {"spearman_25", "spearman_50", "spearman_75", "mse"} <= set(m["metrics"])
    assert m["training"]["command"] == "pytest" and m["training"]["method"] == "fudge"


def test_value_head_is_in_reward_stds(run_dir: Path, tmp_path: Path) -> None:
    """Targets are standardised by the base samples' reward spread, stored with the head."""
    head = run_training(_cfg(run_dir, tmp_path / "v", "value", method="fudge", epochs=2))
    st = head.manifest["reward_stats"]
    tr = head.manifest["training"]
    assert st["std"] == pytest.approx(tr["train_reward_std"]) and st["std"] > 0
    assert float(head.module.r_std) == pytest.approx(st["std"])
    assert float(head.module.r_mean) == pytest.approx(st["mean"])
    loaded = load_head(tmp_path / "v")
    assert loaded.reward_stats == pytest.approx({"mean": st["mean"], "std": st["std"]})
    h = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loaded.module.reward(h),
                          st["mean"] + st["std"] * loaded.module(h), atol=1e-5)


def test_old_value_head_without_stats_loads_as_raw(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from alignserve.value_models.heads import Head, save_head

    head = ValueHead(8, 4)
    save_head(tmp_path / "old", Head("old", "value", head, {"arch": {"dim": 8, "hidden": 4},
                                                           "tokenizer": "vocab-x"}))
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("r_")}
    save_file(state, str(tmp_path / "old" / "head.safetensors"))  # as written before the stats
    loaded = load_head(tmp_path / "old")
    assert float(loaded.module.r_mean) == 0.0 and float(loaded.module.r_std) == 1.0
    assert loaded.reward_stats == {"mean": 0.0, "std": 1.0}


def test_undefined_metrics_are_written_as_strict_json_null(tmp_path: Path) -> None:
    """A NaN or infinite metric (e.g. a Spearman of constant predictions) is written as null,
    not as the bare NaN / Infinity tokens strict JSON readers reject."""
    import json

    from alignserve.value_models.heads import Head, save_head

    manifest = {"arch": {"dim": 8, "hidden": 4}, "tokenizer": "vocab-x",
                "metrics": {"spearman": float("nan"), "mse": 0.25,
                            "per_bucket": [1.0, float("inf"), float("-inf")]}}
    save_head(tmp_path / "h", Head("h", "value", ValueHead(8, 4), manifest))

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    written = json.loads((tmp_path / "h" / "manifest.json").read_text(), parse_constant=refuse)
    assert written["metrics"] == {"spearman": None, "mse": 0.25, "per_bucket": [1.0, None, None]}
    assert load_head(tmp_path / "h").manifest["metrics"]["spearman"] is None


@pytest.mark.parametrize("method", ["td-lambda", "cd-q"])
def test_bootstrapped_value_methods_run(run_dir: Path, tmp_path: Path, method: str) -> None:
    head = run_training(_cfg(run_dir, tmp_path / "v", "value", method=method, epochs=3,
                             val_prompts=0))
    assert all(torch.isfinite(p).all() for p in head.module.parameters())


def test_same_seed_is_bit_identical_and_resume_matches(run_dir: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    a = run_training(_cfg(run_dir, tmp_path / "a", "value", method="td-lambda", epochs=4,
                          val_prompts=0))
    b = run_training(_cfg(run_dir, tmp_path / "b", "value", method="td-lambda", epochs=4,
                          val_prompts=0))
    assert _same(a.module, b.module)
    # 2 epochs, then resume to 4 from the checkpoint == 4 epochs straight
    run_training(_cfg(run_dir, tmp_path / "c", "value", method="td-lambda", epochs=2,
                      val_prompts=0, name="r"))
    c = run_training(_cfg(run_dir, tmp_path / "c", "value", method="td-lambda", epochs=4,
                          val_prompts=0, name="r", resume=True))
    assert [h["epoch"] for h in c.manifest["training"]["history"]] == [1, 2, 3, 4]
    assert _same(a.module, c.module)
    # a checkpoint past the asked epochs is refused, not saved as if it had that many, and
    # before the model loads (which would take seconds)
    from alignserve.value_models import training

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded before the checkpoint was checked")

    monkeypatch.setattr(training, "BaseModel", no_model)
    with pytest.raises(ValueError, match="at epoch 4, past --epochs 2"):
        run_training(_cfg(run_dir, tmp_path / "c", "value", method="td-lambda", epochs=2,
                          val_prompts=0, name="r", resume=True))
    # another setting is refused too, naming what changed
    with pytest.raises(ValueError, match=r"other settings \(--lam 0.95 then, 0.5 now\)"):
        run_training(_cfg(run_dir, tmp_path / "c", "value", method="td-lambda", epochs=4,
                          val_prompts=0, name="r", resume=True, lam=0.5))
    # the weights are as readable as the manifest (safetensors alone writes owner-only files)
    mode = [(tmp_path / "a" / f).stat().st_mode & 0o777
            for f in ("head.safetensors", "manifest.json")]
    assert mode[0] == mode[1] and mode[0] & 0o044, [oct(m) for m in mode]


@pytest.mark.parametrize(("kw", "needle"), [
    ({"max_new_tokens": 100_000}, "--max-new-tokens must be from 1 to 1024, got 100000"),
    ({"epochs": 0}, "--epochs must be >= 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"top_p": 0.0}, r"--top-p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
    ({"temperature": 0.0}, "--temperature must be finite and > 0"),
    ({"temperature": float("nan")}, "--temperature must be finite and > 0"),
    ({"lr": -1e-3}, "--lr must be finite and > 0"),
    ({"weight_decay": -1.0}, "--weight-decay must be finite and >= 0"),
    ({"hidden": 0}, "--hidden must be >= 1"),
    ({"lam": 2.0}, r"--lam must be in \[0, 1\]"),
    ({"kind": "arm", "beta_r": 0.0}, "--beta-r must be finite and > 0"),
    ({"kind": "arm", "margin": -1.0}, "--margin must be finite and >= 0"),
    ({"kind": "arm", "rank": 0}, "--rank must be >= 1"),
    ({"prompts": -3}, r"--prompts must be >= 1 \(or 0 for all\), got -3"),
    ({"name": "../evil"}, "--name must be"),
    ({"threads": 0}, "--threads must be >= 1"),
    ({"name": ""}, "--name must be"),
    ({"aux_partial": float("nan")}, "--aux-partial finite and >= 0"),
    ({"refresh_every": -3}, "--refresh-every must be >= 0"),
    # settings the head would not use: refused, not recorded in its manifest as if they had
    ({"method": "fudge", "lam": 0.5}, "--lam is the lambda of td-lambda .* --method fudge"),
    ({"kind": "arm", "lam": 0.5}, "--lam is .* this head is a arm head"),
    ({"method": "fudge", "refresh_every": 2}, "--refresh-every is for value heads with boot"),
    ({"kind": "arm", "refresh_every": 2}, "--refresh-every is for value heads"),
    ({"aux_every": 2}, "--aux-every .* needs --aux-partial > 0"),
    ({"kind": "arm", "aux_partial": 1.0}, "--aux-partial is for value heads"),
])
def test_training_settings_are_refused_before_sampling(kw, needle) -> None:
    """Each would crash, be ignored or save a useless head minutes into a run; resolved()
    (called before any sampling) names the flag and the allowed range."""
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**{"kind": "value", "reward": "concise", "out": "/tmp/x", **kw}).resolved()


def test_training_defaults_fill_only_the_settings_a_head_uses() -> None:
    """The manifest records what the run used: lambda and the refresh period for td-lambda,
    the refresh period alone for cd-q, neither for fudge heads and ARMs; --aux-every only with
    --aux-partial."""
    def cfg(**kw):
        return TrainConfig(**{"kind": "value", "reward": "concise", "out": "/tmp/x",
                              **kw}).resolved()

    td, cdq, fudge = cfg(), cfg(method="cd-q"), cfg(method="fudge")
    assert (td.lam, td.refresh_every, td.aux_every) == (0.95, 0, None)
    assert (cdq.lam, cdq.refresh_every) == (None, 4)
    assert (fudge.lam, fudge.refresh_every) == (None, None)
    assert cfg(aux_partial=1.0).aux_every == 4
    arm = TrainConfig(kind="arm", reward="concise", out="/tmp/x").resolved()
    assert (arm.lam, arm.refresh_every, arm.aux_every) == (None, None, None)


def test_training_out_and_run_dir_must_be_folders(tmp_path: Path) -> None:
    f = tmp_path / "a_file"
    f.write_text("x")
    for kw, flag in (({"out": str(f)}, "--out"), ({"out": str(f / "sub")}, "--out"),
                     ({"out": str(tmp_path / "h"), "run_dir": str(f)}, "--run-dir"),
                     ({"out": str(tmp_path / "h"), "run_dir": str(f / "sub")}, "--run-dir")):
        with pytest.raises(ValueError, match=f"{flag} .*a_file.* is not a folder"):
            TrainConfig(**{"kind": "value", "reward": "concise", **kw}).resolved()


def test_train_all_checks_every_head_before_sampling(tmp_path: Path) -> None:
    """The shipped sentiment_lex needs >= 4 prompts: train all refuses 2 before sampling for
    its first head (no sample cache is made), and refuses an --out below a file."""
    from alignserve.value_models.training import train_all

    run = tmp_path / "run"
    with pytest.raises(ValueError, match="--prompts must be >= 4"):
        train_all(tmp_path / "out", prompts=2, run_dir=str(run), progress=False)
    assert not run.exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--out .* is not a folder"):
        train_all(tmp_path / "f", run_dir=str(run), progress=False)


def test_arm_learns_loads_and_is_deterministic(run_dir: Path, tmp_path: Path) -> None:
    kw = dict(epochs=6, margin=0.0, batch_size=2, lr=5e-3, val_prompts=0)
    a = run_training(_cfg(run_dir, tmp_path / "concise_arm", "arm", **kw))
    hist = a.manifest["training"]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"], hist
    loaded = load_head(tmp_path / "concise_arm")
    assert isinstance(loaded.module, ARMHead) and loaded.manifest["arch"]["rank"] == 32
    b = run_training(_cfg(run_dir, tmp_path / "again", "arm", **kw))
    assert _same(a.module, b.module)


@pytest.mark.parametrize("arm_reward, positions", [("increment", 0), ("token", 0),
                                                   ("token", 8)])
def test_lexical_arm_learns_loads_and_is_deterministic(run_dir: Path, tmp_path: Path,
                                                       model_dir: Path, arm_reward: str,
                                                       positions: int) -> None:
    """A lexical ARM (per-token bias from the word-start feature) trains as its reward form
    (the increment over the base, or the per-token reward; with positions, also reading the
    word count so far and the end-of-text flag), saves its token table and reward form and
    loads as a LexicalARM that reads no states."""
    kw = dict(epochs=6, margin=0.0, batch_size=2, lr=5e-2, val_prompts=0, lexical=True,
              hidden=4, arm_reward=arm_reward, positions=positions)
    a = run_training(_cfg(run_dir, tmp_path / "concise_lex_arm", "arm", **kw))
    hist = a.manifest["training"]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"], hist
    loaded = load_head(tmp_path / "concise_lex_arm")
    assert isinstance(loaded.module, LexicalARM) and loaded.runner == "tokens"
    assert loaded.module.reward_form == arm_reward == loaded.manifest["arch"]["reward_form"]
    # a per-token reward's bias spans ~+-20 logits: its weights stop at 0.5, not 5
    # (a positional one's at 0.3: alpha 0.5 cut concise answers to a word or two)
    assert loaded.manifest["weight_range"] == ([0.0, 0.3] if positions else [0.0, 0.5]
                                               if arm_reward == "token" else [0.0, 5.0])
    assert loaded.manifest["arch"]["lexical"]["featurizer"] == "word_starts"
    assert loaded.module.table.sum() > 0  # the word-start feature of the vocabulary
    assert loaded.module.positions == positions == loaded.manifest["arch"].get("positions", 0)
    if positions:  # the base's end of text, flagged from the model's own config
        from alignserve.engine.scheduler import eos_ids_from_config

        ends = loaded.module.end.nonzero()[:, 0].tolist()
        assert ends and ends == sorted(eos_ids_from_config(model_dir))
        # past the samples' length (12 tokens here) the ARM adds no bias
        assert loaded.module.horizon == loaded.manifest["arch"]["horizon"] == 12
    b = run_training(_cfg(run_dir, tmp_path / "again", "arm", **kw))
    assert _same(a.module, b.module)


def test_positional_arm_with_end_pairs_learns_what_ending_early_costs(
        run_dir: Path, tmp_path: Path) -> None:
    """``--end-pairs 3``: every answer is also paired against its prefixes cut at every 3rd
    token and ended there (scored by the reward on the prefix's text); the manifest records the
    setting and the held-out accuracy on such pairs, and the same seed trains the same head."""
    kw = dict(epochs=4, margin=0.0, batch_size=2, lr=5e-2, lexical=True, hidden=4,
              positions=8, end_pairs=3)
    a = run_training(_cfg(run_dir, tmp_path / "concise_lex_arm", "arm", **kw))
    m = a.manifest
    assert m["training"]["end_pairs"] == 3
    met = m["metrics"]
    assert met["end_pair_count"] > 0 and 0.0 <= met["end_pairwise_accuracy"] <= 1.0
    assert "val_end_pairwise_accuracy" in m["training"]["history"][-1]
    hist = m["training"]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"], hist
    b = run_training(_cfg(run_dir, tmp_path / "again", "arm", **kw))
    assert _same(a.module, b.module)
    plain = run_training(_cfg(run_dir, tmp_path / "plain", "arm", **{**kw, "end_pairs": 0}))
    assert not _same(a.module, plain.module)  # the extra pairs change what is learned
    assert "end_pairwise_accuracy" not in plain.manifest["metrics"]


def test_q_head_distils_the_value_head_and_is_deterministic(run_dir: Path,
                                                           tmp_path: Path) -> None:
    """A Q-head learns V([s, a]) - V(s) of the value head trained beside it (train all's
    layout: <reward>_value next to the Q-head's folder), bit-identically for one seed."""
    v = run_training(_cfg(run_dir, tmp_path / "concise=1_value", "value", method="fudge",
                          epochs=20, lr=3e-3))
    kw = dict(epochs=30, lr=3e-3, batch_size=64, rank=8)
    a = run_training(_cfg(run_dir, tmp_path / "concise_q", "q", **kw))
    hist = a.manifest["training"]["history"]
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"], hist
    assert a.manifest["training"]["value_head"] == str(v.path)
    assert a.manifest["training"]["method"] == "distill-v"
    # the regression's shrinkage is undone: predictions spread like the targets
    assert float(a.module.scale) == pytest.approx(a.manifest["training"]["calibration_scale"])
    assert float(a.module.scale) > 0.9
    assert {"spearman", "first_token_pairwise_accuracy"} <= set(a.manifest["metrics"])
    loaded = load_head(tmp_path / "concise_q")
    assert loaded.kind == "q" and loaded.info.kind == "q_head"
    assert isinstance(loaded.module, QHead) and _same(loaded.module, a.module)
    # [N, D] states x [N, k, D] candidate embeddings -> [N, k] advantages
    gen = torch.Generator().manual_seed(0)
    out = loaded.module(torch.randn(2, 576, generator=gen), torch.randn(2, 5, 576, generator=gen))
    assert out.shape == (2, 5) and out.dtype == torch.float32
    b = run_training(_cfg(run_dir, tmp_path / "again_q", "q", value_head=str(v.path), **kw))
    assert _same(a.module, b.module)
    with pytest.raises(ValueError, match="not a value head"):
        run_training(_cfg(run_dir, tmp_path / "bad_q", "q", value_head=str(a.path), **kw))


def test_backbone_features_batch_prompts_to_the_slots(run_dir: Path, tmp_path: Path) -> None:
    """Featurising a prompt holds 1 + K sequences (its prefix, one fork per sample), so a runner
    with few slots takes fewer prompts at a time (it used to fork past its slots with K = 8 and
    64 slots), the features do not depend on the batching, and too few slots for even one
    prompt is a clear error."""
    from alignserve.value_models import training as T

    cfg = _cfg(run_dir, tmp_path / "unused", "value").resolved()
    few, many, two = (T.BaseModel(cfg.model, cfg.device, n, None) for n in (3, 64, 2))
    try:
        data = T.sample_responses(many, cfg, T.select_prompts("train", cfg.suite, cfg.prompts),
                                  T.cache_dir(cfg, "train"))
        assert {len(p["tokens"]) for p in data["prompts"]} == {2}  # K = 2 samples per prompt
        out = {}
        for name, base in (("few", few), ("many", many)):
            (tmp_path / name).mkdir()
            out[name] = T.extract_features(base, data, tmp_path / name, progress=False,
                                           backbone_layers=2)
        (tmp_path / "two").mkdir()
        with pytest.raises(ValueError, match="too few"):
            T.extract_features(two, data, tmp_path / "two", progress=False, backbone_layers=2)
    finally:
        for b in (few, many, two):
            b.close()
    a, b = out["few"], out["many"]
    assert torch.equal(a["offsets"], b["offsets"]) and torch.equal(a["tokens"], b["tokens"])
    torch.testing.assert_close(a["hidden"], b["hidden"], atol=1e-4, rtol=1e-4)


def test_backbone_value_head_trains_and_steers_vas(run_dir: Path, tmp_path: Path,
                                                    model_dir: Path) -> None:
    """Placement 'backbone': a head on the base's first 4 layers, served on its own KV cache."""
    from alignserve.decoders import build_decoder
    from alignserve.engine.sampling import SamplingParams
    from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
    from alignserve.server.main import attach_backbones
    from alignserve.value_models.heads import tokenizer_fingerprint
    from alignserve.value_models.registry import Registry

    out = tmp_path / "heads" / "concise_value"
    head = run_training(_cfg(run_dir, out, "value", method="fudge", epochs=20, lr=3e-3,
                             backbone_layers=4))
    hist = head.manifest["training"]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert head.manifest["placement"] == "backbone" and head.manifest["arch"]["layers"] == 4
    eng = Engine(EngineConfig(model_dir=model_dir, slots=4, max_len=256))
    try:
        reg = Registry.build(out.parent, tokenizer_fingerprint(eng.tokenizer), 576)
        assert reg.heads["concise_value"].runner == "backbone-4"
        attach_backbones(eng, reg)
        assert eng.runners["backbone-4"].config.num_layers == 4
        ids = eng.tokenizer("Tell me about the sea.").input_ids

        def gen(weight: float) -> dict:
            dec = build_decoder({"strategy": "vas", "top_k": 5,
                                 "weights": {"concise_value": weight}}, registry=reg)
            return eng.generate(EngineRequest(
                prompt_ids=ids, decoder=dec, resources=reg,
                params=SamplingParams(temperature=1.0, max_tokens=8, seed=2)))

        guided = gen(20.0)
        assert guided["stats"].guidance_forwards == 2 * len(guided["choices"][0]["tokens"]) \
            or guided["choices"][0]["finish_reason"] == "stop"
        assert eng.runners["backbone-4"].num_free == 4  # its sequences were freed
        plain = gen(0.0)
        dec = build_decoder(None)
        ref = eng.generate(EngineRequest(prompt_ids=ids, decoder=dec, params=SamplingParams(
            temperature=1.0, max_tokens=8, seed=2)))
        assert plain["choices"][0]["tokens"] == ref["choices"][0]["tokens"]
    finally:
        eng.shutdown()


def test_backbone_arm_trains_and_steers_genarm(run_dir: Path, tmp_path: Path,
                                                model_dir: Path) -> None:
    """An ARM that is its own small LM (the base's first 4 layers + adapter), used by GenARM."""
    from alignserve.decoders import build_decoder
    from alignserve.engine.sampling import SamplingParams
    from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
    from alignserve.server.main import attach_backbones
    from alignserve.value_models.heads import tokenizer_fingerprint
    from alignserve.value_models.registry import Registry

    out = tmp_path / "heads" / "concise_arm"
    head = run_training(_cfg(run_dir, out, "arm", epochs=3, backbone_layers=4))
    assert head.manifest["placement"] == "backbone" and head.manifest["arch"]["layers"] == 4
    eng = Engine(EngineConfig(model_dir=model_dir, slots=4, max_len=256))
    try:
        reg = Registry.build(out.parent, tokenizer_fingerprint(eng.tokenizer), 576)
        attach_backbones(eng, reg)
        ids = eng.tokenizer("Tell me about the sea.").input_ids
        dec = build_decoder({"strategy": "genarm", "weights": {"concise_arm": 1.0}},
                            registry=reg)
        assert dec.slots_needed(1) == {"base": 1, "backbone-4": 1}
        res = eng.generate(EngineRequest(prompt_ids=ids, decoder=dec, resources=reg,
                                         params=SamplingParams(max_tokens=6, seed=1)))
        assert res["choices"][0]["tokens"]
        assert all(i.policy_logprob is not None for i in res["choices"][0]["infos"])
        assert eng.runners["backbone-4"].num_free == 4
    finally:
        eng.shutdown()


def test_partial_text_auxiliary_target(run_dir: Path, tmp_path: Path, model_dir: Path) -> None:
    """--aux-partial: the partial responses' rewards sit at the right state rows (NaN
    elsewhere), the auxiliary loss changes the head, and the same seed still trains it twice
    bit for bit."""
    import math

    from alignserve.value_models.rewards import default_rewards
    from alignserve.value_models.training import cache_dir

    cfg = _cfg(run_dir, tmp_path / "a", "value", method="fudge", epochs=3, val_prompts=0,
               aux_partial=1.0, aux_every=3)
    a = run_training(cfg)
    b = run_training(_cfg(run_dir, tmp_path / "b", "value", method="fudge", epochs=3,
                          val_prompts=0, aux_partial=1.0, aux_every=3))
    plain = run_training(_cfg(run_dir, tmp_path / "p", "value", method="fudge", epochs=3,
                              val_prompts=0))
    assert _same(a.module, b.module) and not _same(a.module, plain.module)
    folder = cache_dir(cfg.resolved(), "train")
    [path] = folder.glob("partial-*-e3-n4.pt")
    partial = torch.load(path, weights_only=True)
    from transformers import AutoTokenizer

    data = torch.load(folder / "samples.pt", weights_only=False)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    concise = default_rewards()["concise"]
    samples = [(p["text"], t) for p in data["prompts"] for t in p["tokens"]]
    at, checked = 0, 0
    for text, t in samples:
        for cut in range(len(t) + 1):
            v = float(partial[at + cut])
            if cut and cut % 3 == 0 and cut < len(t):
                want = concise.score([text], [tok.decode(t[:cut], skip_special_tokens=True)])[0]
                assert v == pytest.approx(want, abs=1e-5)
                checked += 1
            else:
                assert math.isnan(v)
        at += len(t) + 1
    assert at == len(partial) and checked > 0


def test_prefix_mean_matches_the_training_features() -> None:
    """Decoding's running mean (PrefixMean) builds exactly the features training reads."""
    from alignserve.value_models.heads import PrefixMean
    from alignserve.value_models.training import mean_pool_features

    torch.manual_seed(0)
    offsets = torch.tensor([0, 3, 4, 9])
    hidden = torch.randn(9, 8)
    feats = mean_pool_features(hidden, offsets, chunk=2)  # chunks split the samples
    assert feats.shape == (9, 16)
    for s in range(3):
        a, b = int(offsets[s]), int(offsets[s + 1])
        pool = PrefixMean(hidden[a])
        torch.testing.assert_close(pool.current(hidden[a][None])[0], feats[a])
        for t in range(a + 1, b):
            # a candidate's extension, then the same state committed
            torch.testing.assert_close(pool.extended(hidden[t][None])[0], feats[t])
            pool.add(hidden[t])
            torch.testing.assert_close(pool.current(hidden[t][None])[0], feats[t])
    torch.testing.assert_close(feats[5, 8:], hidden[4:6].mean(0))


def test_pooled_heads_read_the_answers_running_mean(run_dir: Path, tmp_path: Path,
                                                     model_dir: Path) -> None:
    """pool='mean' value heads, Q-heads and ARMs: trained on [h_t, mean(h_0..h_t)], and VAS /
    GenARM feed them exactly those features of the answer being written (checked against a
    teacher-forced forward of prompt + answer), with tree values, Q-head values and ARMs."""
    from alignserve.decoders import build_decoder
    from alignserve.engine.primitives import Extend
    from alignserve.engine.sampling import SamplingParams
    from alignserve.engine.scheduler import Engine, EngineConfig, EngineRequest
    from alignserve.value_models.heads import tokenizer_fingerprint
    from alignserve.value_models.registry import Registry
    from alignserve.value_models.training import mean_pool_features

    heads = tmp_path / "heads"
    v = run_training(_cfg(run_dir, heads / "concise=1_value", "value", method="fudge",
                          epochs=3, pool="mean"))
    q = run_training(_cfg(run_dir, heads / "concise_q", "q", epochs=3, rank=8))
    a = run_training(_cfg(run_dir, heads / "concise_arm", "arm", epochs=2, rank=4,
                          pool="mean"))
    assert {h.manifest["arch"]["pool"] for h in (v, q, a)} == {"mean"}
    assert q.manifest["training"]["pool"] == "mean"  # recorded as what it reads
    assert v.module.mu.shape == (1152,) and q.module.mu.shape == (1152,)
    assert a.module.down.weight.shape == (4, 1152)
    assert a.manifest["training"]["history"][-1]["train_loss"] \
        < a.manifest["training"]["history"][0]["train_loss"]
    with pytest.raises(ValueError, match="--pool is for value heads"):
        _cfg(run_dir, tmp_path / "x", "q", pool="mean").resolved()
    eng = Engine(EngineConfig(model_dir=model_dir, slots=4, max_len=256))
    cases = (  # (strategy options, head spied on, its method, what it reads)
        ({"strategy": "vas", "values": "tree"}, "concise=1_value", "forward", "candidates"),
        ({"strategy": "vas", "values": "q"}, "concise_q", "forward", "current"),
        ({"strategy": "genarm"}, "concise_arm", "logprobs", "current"))
    try:
        reg = Registry.build(heads, tokenizer_fingerprint(eng.tokenizer), 576)
        ids = eng.tokenizer("Tell me about the sea.").input_ids
        for opts, name, method, reads in cases:
            module, seen = reg.heads[name].module, []
            orig = getattr(module, method)

            def spy(x, *rest, orig=orig, seen=seen):  # type: ignore[no-untyped-def]
                seen.append(x.detach().clone())
                return orig(x, *rest)

            setattr(module, method, spy)
            try:
                # top_k 3 at temperature 1: some tokens taken lie outside the candidates
                dec = build_decoder({**opts, "top_k": 3, "weights": {"concise=1": 4.0}}
                                    if opts["strategy"] == "vas" else
                                    {**opts, "weights": {"concise=1": 2.0}}, registry=reg)
                out = eng.generate(EngineRequest(
                    prompt_ids=ids, decoder=dec, resources=reg,
                    params=SamplingParams(temperature=1.0, max_tokens=6, seed=5,
                                          ignore_eos=True)))
            finally:
                delattr(module, method)
            assert out["info"].get("values", "arm") == opts.get("values", "arm")
            toks = out["choices"][0]["tokens"]
            runner = eng.base
            seq = runner.new_seq()
            try:
                [o] = runner.run([Extend(seq, ids + toks, logits="all", hidden=True)])
            finally:
                runner.free(seq)
            states = o.hidden[len(ids) - 1:].float().cpu()  # h_0 .. h_T
            want = mean_pool_features(states, torch.tensor([0, len(states)]))
            assert len(seen) == len(toks) == 6
            for t, x in enumerate(seen):
                if reads == "current":  # the current state s_t
                    torch.testing.assert_close(x[0], want[t], atol=2e-3, rtol=1e-3)
                else:  # candidates a: [h_a, (h_0 + .. + h_t + h_a) / (t + 2)], whether
                    # the last token taken was a candidate (committed) or not (extended)
                    d = x.shape[1] // 2
                    before = x[:, d:] - x[:, :d] / (t + 2)
                    torch.testing.assert_close(
                        before, (want[t, d:] * (t + 1) / (t + 2)).expand_as(before),
                        atol=2e-3, rtol=1e-3)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("kw,message", [
    ({"slots": 2}, "--slots 2 is too few for --samples 2"), ({"samples": 0}, "--samples"),
    ({"max_new_tokens": 0}, "--max-new-tokens"), ({"val_prompts": -1}, "--val-prompts"),
    ({"backbone_layers": -1}, "--backbone-layers"),
])
def test_bad_sizes_are_refused_before_sampling(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _cfg(tmp_path, tmp_path / "h", "value", **kw).resolved()


def test_backbone_deeper_than_the_base_is_refused_before_sampling(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--backbone-layers must be from 0 .* to 30 .* got 31"):
        run_training(_cfg(run, tmp_path / "h", "value", backbone_layers=31))
    assert not list(run.rglob("*.pt"))  # nothing was sampled


def test_lexical_head_with_fitted_word_scores(run_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``sentiment``'s lexical featurizer is fitted to the train answers (``minilm_words_fit``):
    training fits the word scores around the prior (stubbed here: scoring MiniLM's 35k words
    takes minutes), stores the table and the lexicon in the head, records the fit, and a
    second run gives the same head."""
    from alignserve.value_models import lexical

    monkeypatch.setitem(lexical.LEXICONS, "minilm_words",
                        (lambda texts: {"the": 0.5, "zebra": -2.0}, "sum"))
    kw = dict(reward="sentiment", lexical=True, epochs=3, val_prompts=0)
    a = run_training(_cfg(run_dir, tmp_path / "sentiment_lex", "value", **kw))
    fit = a.manifest["arch"]["lexical"]["word_fit"]
    assert a.manifest["arch"]["lexical"]["featurizer"] == "minilm_words_fit"
    assert fit["answers"] == 8 and fit["prompts"] == 4 and fit["fitted_words"] > 10
    loaded = load_head(tmp_path / "sentiment_lex")
    words = loaded.module.lexicon.words
    assert words["zebra"] == pytest.approx(-2.0 * fit["prior_weight"])  # unseen: k * prior
    assert len(words) == fit["words"] and loaded.module.lexicon.combine == "sum"
    texts = loaded.module.lexicon.texts
    rows = loaded.module.table[:, 0]
    some = [i for i, t in enumerate(texts) if lexical.word_sum(t, words)][:50]
    assert some and all(float(rows[i]) == pytest.approx(lexical.word_sum(texts[i], words))
                        for i in some)
    b = run_training(_cfg(run_dir, tmp_path / "again", "value", **kw))
    assert _same(a.module, b.module)


def test_lexical_featurizer_and_word_fit_alpha_are_honoured(run_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            model_dir: Path) -> None:
    """``--word-fit-alpha`` fixes the ridge penalty of the fitted word scores (no
    cross-validated choice), and ``--featurizer`` replaces the reward's own featurizer: a
    sentiment head on word starts has that table and no lexicon."""
    from alignserve.value_models import lexical

    monkeypatch.setitem(lexical.LEXICONS, "minilm_words",
                        (lambda texts: {"the": 0.5, "zebra": -2.0}, "sum"))
    kw = dict(reward="sentiment", lexical=True, epochs=1, val_prompts=0)
    a = run_training(_cfg(run_dir, tmp_path / "fixed", "value", word_fit_alpha=1000.0, **kw))
    fit = a.manifest["arch"]["lexical"]["word_fit"]
    assert fit["alpha"] == 1000.0 and list(fit["cv_mse"]) == ["1000.0"]
    assert a.manifest["training"]["word_fit_alpha"] == 1000.0
    b = run_training(_cfg(run_dir, tmp_path / "starts", "value", featurizer="word_starts", **kw))
    assert b.manifest["arch"]["lexical"]["featurizer"] == "word_starts"
    assert "word_fit" not in b.manifest["arch"]["lexical"] and b.module.lexicon is None
    from transformers import AutoTokenizer

    want = lexical.lexical_table("word_starts", AutoTokenizer.from_pretrained(str(model_dir)))
    assert torch.equal(load_head(tmp_path / "starts").module.table, want)


@pytest.mark.parametrize(("argv", "needle"), [
    (["train", "arm", "--reward", "concise", "--out", "/tmp/x", "--lexical", "--rank", "4"],
     "--rank does not apply here: a lexical ARM is a bias MLP"),
    (["train", "arm", "--reward", "concise", "--out", "/tmp/x", "--hidden", "4"],
     "--hidden does not apply here"),
])
def test_cli_refuses_flags_the_head_would_ignore(argv, needle, capsys) -> None:
    from alignserve.cli import main

    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_unknown_flag_shows_the_subcommands_usage(capsys) -> None:
    from alignserve.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["train", "value", "--reward", "concise", "--out", "/tmp/x", "--arm-reward",
              "token"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "usage: alignserve train value" in err
    assert "unrecognized arguments: --arm-reward token" in err


def test_heads_folder_problems_are_named(tmp_path: Path, caplog, capsys) -> None:
    """A head without its weights names the missing file; an empty --heads folder is a
    warning; a --heads path that does not exist fails before the model loads."""
    import logging
    import shutil

    from alignserve.cli import main
    from alignserve.value_models.heads import HeadError, default_heads_dir, load_heads

    shutil.copytree(default_heads_dir() / "concise_lex", tmp_path / "h" / "concise_lex")
    assert [h.name for h in load_heads(tmp_path / "h")] == ["concise_lex"]
    (tmp_path / "h" / "concise_lex" / "head.safetensors").unlink()
    with pytest.raises(HeadError, match="head.safetensors is missing"):
        load_heads(tmp_path / "h")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="alignserve.heads"):
        assert load_heads(tmp_path / "empty") == []
    assert "holds no head" in caplog.text
    assert main(["serve", "--heads", str(tmp_path / "nope")]) == 2
    assert f"--heads {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
