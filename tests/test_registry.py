"""Registry: the promotion gate (pure) and registration against real MLflow stores.

Store tests use a sqlite store in a temporary folder and a real ``mlflow server`` on 127.0.0.1
(fixture ``mlflow_server`` in ``tests/servers.py``); the student is a tiny random-weight one.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import ConfigError, from_dict
from components.registry.card import model_card
from components.registry.gate import (
    PROTOCOL_FIELDS,
    Decision,
    Lineage,
    RegisterConfig,
    protocol_id,
    should_promote,
)
from components.registry.store import (
    artifact_location,
    flatten,
    prompts_and_seeds,
    register_student,
    tracking_uri,
)

RULE = RegisterConfig(model_name="m", experiment="e", fid_margin=1.0, clip_tolerance=0.25)


def rec(fid=10.0, clip=0.5, protocol="p1", fid_std=0.0, clip_std=0.0):
    """A gate record; noise 0 unless given, so the configured margins decide."""
    return {"fid": fid, "clip_score": clip, "protocol": protocol, "fid_std": fid_std,
            "clip_score_std": clip_std}


# ---------------------------------------------------------------- the gate (pure)

def test_no_champion_promotes():
    assert should_promote(rec(), None, RULE) == Decision(True, "no champion yet")


@pytest.mark.parametrize("fid, promote", [
    (8.0, True),     # 2.0 better, margin 1.0
    (9.0, True),     # exactly the margin (values exact in binary)
    (9.5, False),    # better, but by less than the margin
    (10.0, False),   # equal
    (12.0, False),   # worse
])
def test_fid_margin(fid, promote):
    decision = should_promote(rec(fid=fid), rec(fid=10.0), RULE)
    assert decision.promote is promote, decision.reason
    if not promote:
        assert "fid" in decision.reason


def test_equal_fid_does_not_promote_even_with_zero_margin():
    rule = RegisterConfig("m", "e", fid_margin=0.0, clip_tolerance=0.0)
    assert not should_promote(rec(), rec(), rule).promote
    assert should_promote(rec(fid=9.999), rec(), rule).promote


@pytest.mark.parametrize("clip, promote", [(0.75, True), (0.5, True), (0.25, True), (0.2, False)])
def test_clip_tolerance(clip, promote):
    decision = should_promote(rec(fid=5.0, clip=clip), rec(fid=10.0, clip=0.5), RULE)
    assert decision.promote is promote, decision.reason
    if not promote:
        assert "clip_score dropped" in decision.reason


@pytest.mark.parametrize("candidate_protocol, champion_protocol", [
    ("p2", "p1"), ("p1", None), (None, "p1"), (None, None), ("", ""),
])
def test_protocol_mismatch_never_promotes(candidate_protocol, champion_protocol):
    decision = should_promote(rec(fid=1.0, protocol=candidate_protocol),
                              rec(fid=100.0, protocol=champion_protocol), RULE)
    assert not decision.promote
    assert "protocol" in decision.reason


@pytest.mark.parametrize("side", ["candidate", "champion"])
@pytest.mark.parametrize("key", ["fid", "clip_score"])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf, "3.0", True])
def test_missing_or_invalid_metric_blocks(side, key, bad):
    candidate, champion = rec(fid=1.0), rec(fid=100.0)
    record = candidate if side == "candidate" else champion
    if bad is None:
        del record[key]
    else:
        record[key] = bad
    decision = should_promote(candidate, champion, RULE)
    assert not decision.promote
    assert side in decision.reason and repr(key) in decision.reason


@pytest.mark.parametrize("fid, promote", [
    (8.0, False),   # 2.0 better: above the configured margin 1.0, inside 2 x noise 2.83
    (7.0, True),    # 3.0 better: outside the noise
])
def test_a_gain_inside_the_noise_stays_candidate(fid, promote):
    decision = should_promote(rec(fid=fid, fid_std=1.0), rec(fid=10.0, fid_std=1.0), RULE)
    assert decision.promote is promote, decision.reason
    assert "± 1" in decision.reason
    if not promote:
        assert "not lower by at least 2.83" in decision.reason and "2 x noise 1.41" in (
            decision.reason)


def test_the_margin_is_never_below_the_noise():
    """Whatever the configured margin, even 0, the gain must clear noise_multiple noises."""
    rule = RegisterConfig("m", "e", fid_margin=0.0, clip_tolerance=0.0, noise_multiple=1.0)
    assert not should_promote(rec(fid=9.0, fid_std=0.8), rec(fid=10.0, fid_std=0.8), rule).promote
    assert should_promote(rec(fid=8.8, fid_std=0.8), rec(fid=10.0, fid_std=0.8), rule).promote
    # a champion registered before noise was measured: the candidate's noise stands for both
    old = {k: v for k, v in rec(fid=10.0).items() if not k.endswith("_std")}
    assert not should_promote(rec(fid=9.0, fid_std=0.8), old, rule).promote
    unmeasured = should_promote({k: v for k, v in rec(fid=1.0).items() if k != "fid_std"}, old,
                                rule)
    assert not unmeasured.promote and "noise of 'fid' is not measured" in unmeasured.reason
    with pytest.raises(ValueError, match="noise_multiple"):
        RegisterConfig("m", "e", 0.0, 0.0, noise_multiple=0.5).validate()


def test_a_clip_drop_inside_the_noise_is_no_drop():
    champion = rec(fid=10.0, clip=0.5, clip_std=0.01)
    assert not should_promote(rec(fid=5.0, clip=0.23, clip_std=0.01), champion, RULE).promote
    noisy = rec(fid=10.0, clip=0.5, clip_std=0.1)
    dropped = should_promote(rec(fid=5.0, clip=0.23, clip_std=0.1), noisy, RULE)
    assert dropped.promote, dropped.reason  # 0.27 drop: above 0.25, inside 2 x noise 0.141
    assert not should_promote(rec(fid=5.0, clip=0.1, clip_std=0.1), noisy, RULE).promote


def test_numpy_and_int_metrics_are_numbers():
    assert should_promote(rec(fid=np.float32(5.0), clip=1), rec(fid=10, clip=0.5), RULE).promote


def test_gate_uses_configured_metric_names():
    rule = RegisterConfig("m", "e", 0.0, 0.0, fid_metric="fid_10k", clip_metric="clip")
    cand = {"fid_10k": 5.0, "clip": 0.3, "protocol": "p", "fid_10k_std": 0.1}
    champ = {"fid_10k": 6.0, "clip": 0.3, "protocol": "p", "fid_10k_std": 0.1}
    assert should_promote(cand, champ, rule).promote
    assert not should_promote(rec(), rec(fid=20.0), rule).promote  # names absent


# ---------------------------------------------------------------- config and helpers

def test_config_from_params_section():
    cfg = from_dict(RegisterConfig, {"model_name": "s", "experiment": "x", "fid_margin": 1,
                                     "clip_tolerance": 0.01}, "register")
    assert cfg.fid_margin == 1.0 and cfg.champion_alias == "champion"
    with pytest.raises(ConfigError, match="valid keys are"):
        from_dict(RegisterConfig, {"model_name": "s", "experiment": "x", "fid_margin": 1,
                                   "clip_tolerance": 0.0, "margin": 2}, "register")
    for bad in ({"fid_margin": -1.0}, {"clip_tolerance": math.nan},
                {"champion_alias": "candidate"}, {"model_name": ""}):
        with pytest.raises(ConfigError, match="register"):
            from_dict(RegisterConfig, {"model_name": "s", "experiment": "x", "fid_margin": 1,
                                       "clip_tolerance": 0.0, **bad}, "register")


def test_tracking_uri_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_location(tmp_path, uri) == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert artifact_location(tmp_path, "http://127.0.0.1:5000") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_prompts_and_seeds():
    assert prompts_and_seeds(["a", "b"]) == (["a", "b"], [0, 1])
    assert prompts_and_seeds("a") == (["a"], [0])
    assert prompts_and_seeds(pd.DataFrame({"prompt": ["a", "b"], "seed": [7, 3]})) == (
        ["a", "b"], [7, 3])
    assert prompts_and_seeds(pd.DataFrame({"prompt": ["a"]})) == (["a"], [0])
    with pytest.raises(ValueError, match="'prompt' column"):
        prompts_and_seeds(pd.DataFrame({"text": ["a"]}))
    with pytest.raises(TypeError, match="list of prompt strings"):
        prompts_and_seeds([1, 2])


# ---------------------------------------------------------------- real stores

@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_student

    return build_tiny_student(tmp_path_factory.mktemp("student") / "student")


@pytest.fixture(scope="module")
def sqlite_root(tmp_path_factory) -> Path:
    """One sqlite store per module: creating its tables costs several seconds."""
    return tmp_path_factory.mktemp("registry")


def lineage(protocol="fid-clip-v1") -> Lineage:
    return Lineage(git_commit="abc123", method="swiftbrush", teacher="tiny", params_hash="ph",
                   eval_protocol=protocol)


def register(cfg, student, uri, root, fid, clip=0.3, protocol="fid-clip-v1", extra=()):
    metrics = {"fid": fid, "fid_std": 0.1, "clip_score": clip, "clip_score_std": 0.001,
               "latency": {"ms_per_image": 4.0}, "note": "x"}
    return register_student(cfg, student, metrics, lineage(protocol), uri=uri,
                            artifact_root=artifact_location(root, uri),
                            params={"distill": {"lr": 1e-5, "steps": 3}}, artifacts=extra)


def load_champion(uri: str, name: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(None)


def check_champion_sequence(cfg, student, uri, root, extra=()):
    from mlflow import MlflowClient

    first = register(cfg, student, uri, root, fid=50.0, extra=extra)
    assert first["promoted"] and first["champion"] == first["version"] == "1"
    worse = register(cfg, student, uri, root, fid=60.0)
    assert not worse["promoted"] and worse["champion"] == "1", worse
    better = register(cfg, student, uri, root, fid=40.0)
    assert better["promoted"] and better["champion"] == better["version"] == "3", better
    client = MlflowClient(uri, registry_uri=uri)
    aliases = client.get_registered_model(cfg.model_name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "3", "candidate": "3"}
    return first, worse, better


def test_sqlite_register_and_promote(student, sqlite_root, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder
    uri = tracking_uri(sqlite_root)
    cfg = RegisterConfig("tiny-student", "distillery", fid_margin=1.0, clip_tolerance=0.05)
    card = sqlite_root / "eval_card.json"
    card.write_text('{"protocol": "fid-clip-v1"}')
    first, worse, _ = check_champion_sequence(cfg, student, uri, sqlite_root, extra=[card])
    assert "not lower" in worse["reason"]

    client = MlflowClient(uri)
    run = client.get_run(first["run_id"])
    assert run.info.run_name == "register"
    assert run.data.params["distill.lr"] == "1e-05"
    assert run.data.metrics["latency.ms_per_image"] == 4.0 and "note" not in run.data.metrics
    assert run.data.tags["eval_protocol"] == "fid-clip-v1"
    assert run.data.tags["git_commit"] == "abc123" and run.data.tags["method"] == "swiftbrush"
    assert [a.path for a in client.list_artifacts(first["run_id"])] == ["eval_card.json"]
    assert list(tmp_path.iterdir()) == []
    assert (sqlite_root / "mlartifacts").is_dir()
    version = client.get_model_version(cfg.model_name, "2")
    assert version.tags["promotion"] == worse["reason"]

    # a better FID under another protocol is not comparable
    other = register(cfg, student, uri, sqlite_root, fid=1.0, protocol="fid-clip-v2")
    assert not other["promoted"] and "protocol" in other["reason"] and other["champion"] == "3"


def test_champion_predicts_images(student, sqlite_root, monkeypatch):
    from components.generation import load_student

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(sqlite_root)
    cfg = RegisterConfig("tiny-predict", "distillery", fid_margin=0.0, clip_tolerance=0.0)
    register(cfg, student, uri, sqlite_root, fid=10.0)
    model = load_champion(uri, cfg.model_name)
    images = model.predict(["a red circle"])
    assert images.dtype == np.uint8 and images.shape == (1, 16, 16, 3)
    seeded = model.predict(pd.DataFrame({"prompt": ["a red circle", "a blue square"],
                                         "seed": [0, 5]}))
    assert seeded.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(seeded[0], images[0])
    direct = load_student(student).generate(["a blue square"], [5])
    np.testing.assert_array_equal(seeded[1], direct[0])


def test_server_register_and_promote(student, mlflow_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RegisterConfig("tiny-student", "distillery", fid_margin=1.0, clip_tolerance=0.05)
    check_champion_sequence(cfg, student, mlflow_server.uri, mlflow_server.folder)
    # artifacts went through the server into its own artifacts folder
    assert any((mlflow_server.folder / "mlartifacts").rglob("student.json"))
    images = load_champion(mlflow_server.uri, cfg.model_name).predict(["a red circle"])
    assert images.dtype == np.uint8 and images.shape == (1, 16, 16, 3)


# ---------------------------------------------------------------- protocol ids and model cards

def card(**changes):
    """An eval card with every field the protocol id reads (values as the evaluate stage writes)."""
    base = {"protocol": "world", "caption_list_sha256": "c" * 64, "n_images": 16,
            "reference_sha256": "r" * 64, "reference_stats_key": "k" * 20, "resize": "none",
            "feature_network": "inception", "feature_weights_sha256": "f" * 64,
            "clip_model": "models/scorer", "clip_weights": "w" * 64, "clip_prefix": "",
            "base_seed": 0, "seeds": "image i uses seed base_seed + i", "precision": "fp32",
            "card_version": 1, "steps": 1, "guidance_scale": None, "device": "cpu",
            "versions": {"torch": "2.13.0"}, "notes": ""}
    return {**base, **changes}


def test_protocol_id_hashes_only_comparability_fields():
    pid = protocol_id(card())
    assert pid.startswith("world-") and len(pid) == len("world-") + 12
    # what is evaluated, where, and with which library versions: same protocol
    for same in ({"steps": 25, "guidance_scale": 4.0}, {"device": "cuda"},
                 {"versions": {"torch": "9"}}, {"notes": "rerun"}):
        assert protocol_id(card(**same)) == pid, same
    # how it is measured: another protocol
    for other in ({"n_images": 256}, {"caption_list_sha256": "d" * 64}, {"base_seed": 1},
                  {"clip_weights": "v" * 64}, {"reference_stats_key": "j" * 20},
                  {"precision": "fp16"}):
        assert protocol_id(card(**other)) != pid, other
    assert protocol_id(card(protocol="coco")).startswith("coco-")
    bad = card()
    del bad["reference_sha256"]
    with pytest.raises(ValueError, match="lacks reference_sha256; re-run the evaluate stage"):
        protocol_id(bad)


EVALUATION = {"protocol": "world",
              "student": {"fid": 260.12, "clip_score": 0.58, "latency_s": 0.0151, "steps": 1,
                          "fid_std": 3.456, "clip_score_std": 0.0071},
              "teacher": {"fid": 192.5, "clip_score": 0.767, "latency_s": 0.2689, "steps": 25,
                          "guidance_scale": 4.0},
              "teacher_1step": {"fid": 265.3, "clip_score": 0.254, "latency_s": 0.0178,
                                "steps": 1, "guidance_scale": 1.0}}


def test_model_card_markdown():
    text = model_card("m", lineage("world-abc"), EVALUATION, {"student": {"card": card()}},
                      extra={"DVC experiment": "nightly-1"})
    lines = text.splitlines()
    assert lines[0] == "# m: one-step student distilled with swiftbrush"
    for fact in ("| method | `swiftbrush` |", "| git commit | `abc123` |",
                 "| eval protocol | `world-abc` |", "| DVC experiment | `nightly-1` |"):
        assert fact in lines
    # the student first, then the teacher rows; guidance only where it is used
    rows = [line for line in lines if line.endswith(" ms |")]
    assert rows == ["| distilled student | 1 |  | 260.12 ± 3.46 | 0.5800 ± 0.0071 | 15.1 ms |",
                    "| teacher | 25 | 4 | 192.50 | 0.7670 | 268.9 ms |",
                    ("| teacher at 1 step (the untrained student) | 1 |  | 265.30 | 0.2540 | "
                     "17.8 ms |")]
    assert "](grid.png)" in text
    assert "| n_images | 16 |" in lines and "| versions | torch 2.13.0 |" in lines
    assert "](grid.png)" not in model_card("m", lineage(), EVALUATION, {}, grid=None)


# ---------------------------------------------------------------- model card, lineage, review

def test_model_card_lineage_tags_and_overview(student, sqlite_root, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from components.registry.store import (
        registry_overview,
        run_url,
        tag_lineage,
        version_record,
    )

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(sqlite_root)
    cfg = RegisterConfig("tiny-card", "distillery", fid_margin=0.0, clip_tolerance=0.0)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG\r\n\x1a\n")
    text = model_card(cfg.model_name, lineage(), EVALUATION, {"student": {"card": card()}})
    result = register_student(cfg, student, {"fid": 5.0, "clip_score": 0.1}, lineage(), uri=uri,
                              artifact_root=artifact_location(sqlite_root, uri),
                              model_card=text, card_files=[grid])
    assert result["run_url"] is None  # a local store has no UI address
    client = MlflowClient(uri, registry_uri=uri)
    listed = {a.path for a in client.list_artifacts(result["run_id"], "model_card")}
    assert listed == {"model_card/model_card.md", "model_card/grid.png"}
    version = client.get_model_version(cfg.model_name, result["version"])
    assert version.description == text

    tag_lineage(uri, result["run_id"], {"dvc_experiment": "nightly-x", "dvc_exp_rev": "f00"},
                cfg.model_name, result["version"])
    record = version_record(client, cfg.model_name, result["version"])
    assert record["tags"]["dvc_experiment"] == "nightly-x" and record["tags"]["dvc_exp_rev"] == "f00"
    assert client.get_run(result["run_id"]).data.tags["dvc_exp_rev"] == "f00"
    assert record["metrics"]["fid"] == 5.0 and record["aliases"] == ["candidate", "champion"]
    [model] = [m for m in registry_overview(uri) if m["name"] == cfg.model_name]
    assert model == {"name": cfg.model_name, "teacher": "tiny", "versions": ["1"],
                     "aliases": {"candidate": "1", "champion": "1"}}
    assert run_url("http://127.0.0.1:5000/", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc")


def test_one_registered_model_per_teacher(student, sqlite_root, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(sqlite_root)
    cfg = RegisterConfig("tiny-one-teacher", "distillery", fid_margin=0.0, clip_tolerance=0.0)
    register(cfg, student, uri, sqlite_root, fid=10.0)
    client = MlflowClient(uri)
    runs_before = len(client.search_runs([client.get_experiment_by_name("distillery")
                                          .experiment_id]))
    other = Lineage(git_commit="abc123", method="swiftbrush", teacher="sd15", params_hash="ph",
                    eval_protocol="fid-clip-v1")
    with pytest.raises(ValueError, match=r"holds students of teacher 'tiny', not 'sd15'.*"
                                         r"set register.model_name"):
        register_student(cfg, student, {"fid": 1.0, "clip_score": 0.3}, other, uri=uri,
                         artifact_root=artifact_location(sqlite_root, uri))
    versions = client.search_model_versions(f"name = '{cfg.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert len(client.search_runs([client.get_experiment_by_name("distillery")
                                   .experiment_id])) == runs_before  # no orphan run


def test_review_cli_against_server(student, mlflow_server, tmp_path, monkeypatch, capsys):
    """The morning loop on a real server: list, candidate vs champion, refused and forced
    promotion; the gate's margins come from the project's params.yaml."""
    from mlflow import MlflowClient

    from pipeline import registry_cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, name = mlflow_server.uri, "tiny-review"
    (tmp_path / "params.yaml").write_text(
        f"register: {{model_name: {name}, experiment: review, fid_margin: 1.0, "
        "clip_tolerance: 0.05}\n")
    cfg = registry_cli.register_config(tmp_path, None)
    first = register(cfg, student, uri, mlflow_server.folder, fid=50.0)
    second = register(cfg, student, uri, mlflow_server.folder, fid=50.5)  # not better by 1.0
    assert (first["champion"], second["version"]) == ("1", "2") and not second["promoted"]
    assert second["run_url"] == (f"{uri}/#/experiments/{second['experiment_id']}/runs/"
                                 f"{second['run_id']}")

    def cli(*args: str) -> str:
        registry_cli.main(["--root", str(tmp_path), "--tracking-uri", uri, *args])
        return capsys.readouterr().out

    listed = cli("list")
    assert f"| {name} | tiny | 1, 2 | candidate → 2, champion → 1 |" in listed
    shown = cli("compare").splitlines()
    assert "| version | 2 | 1 |" in shown
    assert "| FID ↓ | 50.500 ± 0.100 | 50.000 ± 0.100 |" in shown
    assert "| eval protocol | fid-clip-v1 | fid-clip-v1 |" in shown
    assert any(line.startswith("gate (FID lower by ≥ max(1, 2 x noise), CLIP score lower by ≤ "
                              "max(0.05, 2 x noise)") and
               "keep the champion: fid not lower by at least 1" in line for line in shown)
    with pytest.raises(SystemExit, match="version 2 not promoted .* add --force"):
        cli("promote")
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert "version 2 is now champion (was 1)" in cli("promote", "--force")
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "2"
    assert champion.tags["promotion"].startswith("promoted by hand, overruling the gate")
    assert "the candidate is the champion" in cli("compare")
    assert "version 2 is already champion" in cli("promote")
    # registered under a stricter margin, so not promoted then; the project's margin now says yes
    strict = RegisterConfig(name, "review", fid_margin=10.0, clip_tolerance=0.05)
    third = register(strict, student, uri, mlflow_server.folder, fid=45.0)
    assert third["version"] == "3" and not third["promoted"] and third["champion"] == "2"
    assert "version 3 is now champion (was 2); promote: better than the champion" in cli(
        "promote")
    assert client.get_model_version_by_alias(name, "champion").tags["promotion"].startswith(
        "promoted by hand: promote")
    with pytest.raises(SystemExit, match="registry: .*no-such-model"):
        cli("--model", "no-such-model", "compare")
    shown = cli("show", "--version", "1").splitlines()
    assert shown[0] == f"# {name} version 1" and "| FID ↓ | 50.000 ± 0.100 |" in shown
    assert cli("show", "--version", "1", "--tag", "git_commit") == "abc123\n"
    with pytest.raises(SystemExit, match="has no tag 'dvc_exp_rev'; it has: eval_protocol, "
                                         "git_commit"):
        cli("show", "--version", "1", "--tag", "dvc_exp_rev")


def test_partial_protocol_is_kept_out_of_the_gate_unless_asked():
    from components.registry.gate import is_complete

    card = {k: 1 for k in PROTOCOL_FIELDS} | {"protocol": "coco2017_5k", "n_reference": 5000,
                                              "complete": True}
    assert is_complete(card) and "partial" not in protocol_id(card)
    for partial in ({"complete": False}, {"n_reference": 32}):
        assert not is_complete(card | partial)
        assert protocol_id(card | partial).startswith("coco2017_5k-partial-")
    rule = RegisterConfig("m", "e", fid_margin=0.0, clip_tolerance=0.0)
    candidate = {"fid": 10.0, "clip_score": 0.3, "protocol": protocol_id(card | {"complete": False})}
    decision = should_promote(candidate, None, rule)
    assert not decision.promote and "register.allow_incomplete" in decision.reason
    assert should_promote(candidate, None, replace(rule, allow_incomplete=True)).promote


def test_evaluate_warns_about_a_partial_protocol():
    from components.evaluation.protocols import get_protocol
    from pipeline.stages.evaluate import protocol_warnings

    assert protocol_warnings(get_protocol("coco2017_5k"), 5000, 5000) == []
    warnings = protocol_warnings(get_protocol("coco2017_5k"), 4, 32)
    assert len(warnings) == 2 and all(w.startswith("evaluate: warning: ") for w in warnings)
    assert "scores 5000 images, this run 4" in warnings[0]
    assert "reference set has 5000 images, `reference.images` 32" in warnings[1]
    assert protocol_warnings(get_protocol("world"), 16, 32) == []


def test_same_student_reuses_its_version_and_a_fresh_store_says_nothing_of_existing(
        student, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    cfg = RegisterConfig("reused-student", "distillery", fid_margin=1.0, clip_tolerance=0.05)
    same = {"student_sha256": "a" * 64, "eval_card_sha256": "b" * 64}

    def reg(identity, fid=50.0):
        metrics = {"fid": fid, "fid_std": 0.1, "clip_score": 0.3, "clip_score_std": 0.001}
        return register_student(cfg, student, metrics, lineage(),
                                uri=uri, artifact_root=artifact_location(tmp_path, uri),
                                identity=identity)

    first = reg(same)
    assert first["version"] == "1" and first["promoted"] and not first["reused"]
    out = capfd.readouterr()
    assert "already exists" not in out.out + out.err
    again = reg(same)
    assert again["version"] == "1" and again["reused"] and again["run_id"] == first["run_id"]
    assert "already the champion" in again["reason"]
    other = reg({**same, "eval_card_sha256": "c" * 64}, fid=40.0)
    assert other["version"] == "2" and other["promoted"] and not other["reused"]


def test_register_identity_is_the_student_and_its_eval_card_less_latency(tmp_path):
    """What the register stage matches a version on: the same student folder (from any path)
    and eval card give the same identity whatever the measured latency; another card setting or
    another weight byte gives another."""
    import shutil

    from pipeline.stages.register import identity

    folder = tmp_path / "a/student"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (folder / "student.json").write_text('{"method": "swiftbrush"}')
    shutil.copytree(folder, tmp_path / "elsewhere/student")
    card = {"protocol": "world", "n_images": 16, "seeds": [0, 15], "latency": {"s": 0.5}}
    first = identity(folder, card)
    assert identity(tmp_path / "elsewhere/student", card | {"latency": {"s": 0.7}}) == first
    assert identity(folder, card | {"n_images": 32})["eval_card_sha256"] != (
        first["eval_card_sha256"])
    (folder / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"weightz")
    assert identity(folder, card)["student_sha256"] != first["student_sha256"]
