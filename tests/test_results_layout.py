"""Benchmark results have one home: results/<model>/<study>/, indexed by RESULTS.md, kept out of the node pack."""

import hashlib
import json
import subprocess
from pathlib import Path

from benchmarks.compbench import experiment

COMPBENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "compbench"
RESULTS = COMPBENCH / "results"
REPO = COMPBENCH.parent.parent


def studies():
    return sorted(p.parent for p in RESULTS.glob("*/*/results.json"))


def test_every_study_sits_under_the_model_it_ran_on():
    assert not list(COMPBENCH.glob("results_*")), "results live under results/<model>/<study>/"
    labels = set(experiment.MODEL_LABELS.values())
    assert {p.name for p in RESULTS.iterdir() if p.is_dir()} <= labels
    assert studies(), "no study found"
    for study in studies():
        model_file = json.loads((study / "results.json").read_text())["model"]["file"]
        assert experiment.MODEL_LABELS[model_file] == study.parent.name, study
        assert (study / "results.md").is_file(), study


def test_results_hold_no_duplicate_files():
    seen = {}
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest not in seen, f"{path} duplicates {seen.get(digest)}"
            seen[digest] = path


def test_results_md_has_a_section_for_every_study_and_no_other():
    text = (COMPBENCH / "RESULTS.md").read_text()
    sections = {line[4:].strip() for line in text.splitlines() if line.startswith("### model")}
    assert sections == {f"{s.parent.name}/{s.name}" for s in studies()}


def test_default_output_is_per_model_and_ignored_by_git():
    out = experiment.default_out("somewhere/tiny_t2i_v2.safetensors")
    assert out == RESULTS / "model2" / "latest"
    assert experiment.default_out("tiny_t2i.safetensors") == RESULTS / "model1" / "latest"
    probe = (out / "results.json").relative_to(REPO)
    assert subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO).returncode == 0


def test_results_are_left_out_of_the_registry_archive():
    patterns = [line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert "benchmarks/compbench/results/" in patterns
