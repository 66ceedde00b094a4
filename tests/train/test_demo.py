"""`python -m train demo`: the whole pipeline once, end to end, and the bar it must meet.

The full run is the most expensive test of the suite (about 13 minutes on 2 CPU cores); it is the
acceptance test of the demo: within its time limit the final model's colour accuracy on held-out
captions is at least twice the shuffled-caption (chance) accuracy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.data import demo as demo_data
from tests.train.conftest import run_cli
from train import demo

TIME_LIMIT_S = 900  # the demo's promise on a 2-core CPU
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "demo.md"
# The live run's scores may differ from the recorded run's by this much: a CPU of another kind adds
# in another order and the samples of a few of the 64 captions change (1/64 = 0.016 each).
DRIFT = 0.1


def _recorded() -> tuple[Path, dict]:
    """The report of the run docs/demo.md quotes: the bench/results/cpu_demo_report_*.json it names."""
    named = re.findall(r"bench/results/(cpu_demo_report_\w+\.json)", DOC.read_text(encoding="utf-8"))
    assert len(set(named)) == 1, f"docs/demo.md should name one recorded demo report, names {sorted(set(named))}"
    path = ROOT / "bench" / "results" / named[0]
    return path, json.loads(path.read_text(encoding="utf-8"))


def _scores(report: dict) -> dict[str, float]:
    """Every alignment score and held-out loss the docs quote, by name."""
    out = {}
    for stage in report["stages"]:
        for key, value in report["alignment"][f"stage_{stage}"].items():
            if key.startswith(("colour", "position")):
                out[f"PixArt stage {stage} {key}"] = value
    for system, facts in report["masking"]["systems"].items():
        for key in ("colour", "colour_shuffled", "position", "position_shuffled", "held_out_loss"):
            out[f"MicroDiT {system} {key}"] = facts["final"][key]
    return out


def _figures(report: dict, recorded: dict):
    """(name, live value, recorded value) for each score of the recorded run."""
    live = _scores(report)
    return [(name, live[name], value) for name, value in _scores(recorded).items()]


def test_demo_meets_its_alignment_bar_within_its_time_limit(tmp_path):
    out = tmp_path / "demo"
    # both cores: the demo is sized for a 2-core machine, not for the suite's one-thread default
    result = run_cli("demo", "--out", out, timeout=TIME_LIMIT_S + 120, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2",
                     HF_HUB_OFFLINE="1")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    print(result.stdout[-2000:])
    print(json.dumps({key: report[key] for key in ("stages", "alignment", "bar", "wall_s")}, indent=1))

    assert report["wall_s"] <= TIME_LIMIT_S
    for path in ["losses.png", *report["files"]["grids"]]:
        assert (out / path).stat().st_size > 0, path
    assert sorted(report["stages"]) == ["1", "2", "3"]
    for stage, facts in report["stages"].items():
        assert facts["steps"] > 0 and facts["final_loss"] > 0 and facts["img_per_s"] > 0, (stage, facts)
        assert 0 < facts["wall_s"] <= report["wall_s"]
    assert report["stages"]["3"]["resolution"] == 2 * report["stages"]["2"]["resolution"]
    assert report["stages"]["3"]["pe_interpolation"] == 2 * report["stages"]["2"]["pe_interpolation"]
    assert report["device_days"] == pytest.approx(report["wall_s"] / 86400)

    # the analyser reads the real held-out images (nearly) perfectly, so its scores mean something
    for name in ("real_images_main", "real_images_aesthetic"):
        assert report["alignment"][name]["colour"] >= 0.95, report["alignment"][name]
    final = report["alignment"]["stage_3"]
    for attribute in ("colour", "position"):
        assert final[attribute] >= 2 * final[f"{attribute}_shuffled"], (attribute, final)
    assert report["bar"]["met"] is True
    assert result.returncode == 0

    # MicroDiT: masked (+ unmasked fine-tune) and unmasked for the same training FLOPs
    masking = report["masking"]
    for path in masking["files"]["grids"] + [masking["files"]["plot"]]:
        assert (out / path).stat().st_size > 0, path
    systems = masking["systems"]
    unmasked = systems["unmasked"]["stages"]["unmasked"]
    one_step = unmasked["global_batch"] * unmasked["flops_per_image"]
    assert abs(systems["unmasked"]["train_flops"] - systems["masked"]["train_flops"]) <= one_step / 2
    assert systems["masked"]["stages"]["masked"]["mask_ratio"] == 0.75 and unmasked["mask_ratio"] == 0.0
    assert systems["masked"]["stages"]["masked"]["steps"] > unmasked["steps"]  # the same FLOPs buy more masked steps
    for system, facts in systems.items():
        curve = facts["curve"]
        assert [p["train_flops"] for p in curve] == sorted(p["train_flops"] for p in curve), system
        assert curve[-1]["train_flops"] == pytest.approx(facts["train_flops"])
        assert curve[-1]["held_out_loss"] < curve[0]["held_out_loss"], (system, curve)
        assert facts["final"]["colour"] >= 2 * facts["final"]["colour_shuffled"], (system, facts["final"])

    # docs/demo.md's figures are a run of this code: the live run lands near the recorded one
    _, recorded = _recorded()
    for name, live, then in _figures(report, recorded):
        assert abs(live - then) <= DRIFT, (name, live, then)


def test_missing_text_encoder_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--text-encoder"):
        demo.find_text_encoder(str(tmp_path / "nowhere"))


def test_demo_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    result = run_cli("demo", "--out", tmp_path, check=False, timeout=120)
    assert result.returncode == 2 and "not empty" in result.stderr


def test_stage_summary_from_metrics_lines():
    # two intervals: 10 steps x 4 images at 20 img/s (2 s), then 10 more at 40 img/s (1 s)
    lines = [{"step": 10, "loss": 0.5, "img_per_s": 20.0}, {"step": 20, "loss": 0.25, "img_per_s": 40.0}]
    summary = demo.summarise_metrics(lines, global_batch=4, log_every=10)
    assert summary["img_per_s"] == pytest.approx(80 / 3)
    assert summary["final_loss"] == pytest.approx(0.25)


def test_held_out_records_have_only_unseen_captions(tmp_path):
    training = demo_data.generate(tmp_path / "train", 200, 32, seed=0, max_objects=1)
    seen = {r["caption"] for r in training}
    held_out = demo._held_out(tmp_path / "held-out", "main", 32, 1, 8, seen, max_objects=1)
    assert len(held_out) == 8
    assert all(r["caption"] not in seen and len(r["objects"]) == 1 for r in held_out)
    candidates = demo_data.generate(tmp_path / "candidates", 4 * 8, 32, seed=1, max_objects=1)  # what _held_out draws
    with pytest.raises(RuntimeError, match="held-out main captions are new"):
        demo._held_out(tmp_path / "again", "main", 32, 1, 8, {r["caption"] for r in candidates}, max_objects=1)


def test_docs_quote_the_recorded_run():
    """docs/demo.md's table is the recorded report's figure_rows, to the digit: when the demo is
    run again and recorded, the docs must be updated with it."""
    path, recorded = _recorded()
    doc = DOC.read_text(encoding="utf-8")
    for row in demo.figure_rows(recorded):
        assert row in doc, f"docs/demo.md lacks this row of {path.name}:\n{row}"
    assert recorded["commit"][:7] in doc and recorded["bar"]["met"] is True


def test_the_unmasked_run_spends_the_masked_systems_flops():
    """demo_masking.unmasked_steps against FLOPs counted here from the model's own formula."""
    from engine import family
    from train import demo_masking

    def flops(stage: str) -> float:  # one step's training FLOPs
        config = demo_masking.stage_config(stage, ["model.fields.caption_channels=384"])
        model = family.of_config(config.model_config()).build(config.model_config())
        side = 8 * config.model.resolution
        return config.train.global_batch * model.flops_per_sample(side, side, config.train.mask_ratio)

    masked, finetune = (demo_masking.stage_config(s).train.steps for s in ("masked", "finetune"))
    spent = masked * flops("masked") + finetune * flops("finetune")
    unmasked = demo_masking.unmasked_steps(384)
    assert abs(unmasked * flops("unmasked") - spent) <= flops("unmasked") / 2
    assert flops("masked") < 0.7 * flops("unmasked") and unmasked < masked + finetune
