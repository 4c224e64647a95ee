"""The demo pipeline end to end on a tiny random model and tiny texts (no download)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from demo import MethodRun, run_demo

GERMAN = [f"Wer {w} sagt, muss auch B sagen, sonst {v} er nicht weiter." for w in ("A", "C", "D", "E", "F", "G")
          for v in ("kommt", "geht", "läuft")]
ENGLISH = ["The licenses for most software are designed to take away your freedom to share and change it.",
           "When we speak of free software, we are referring to freedom, not price.",
           "Developers that use the GNU GPL protect your rights with two steps.",
           "For the developers' and authors' protection, the GPL clearly explains that there is no warranty.",
           "Some devices are designed to deny users access to install or run modified versions of the software.",
           "Finally, every program is threatened constantly by software patents."]


def test_demo_pipeline_on_tiny_model(tmp_path, capfd):
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny", GERMAN + ENGLISH, hidden=32, layers=2, vocab=96)
    capfd.readouterr()
    buf = io.StringIO()
    console = Console(file=buf, width=160)
    paths = run_demo(tmp_path / "run", console, steps=2, model=model, target_docs=GERMAN, source_docs=ENGLISH,
                     target_items=5, source_items=3, selection_items=3, max_length=32, batch_size=4,
                     methods=[MethodRun("lora", 1e-3), MethodRun("hft", 1e-4)])
    text = buf.getvalue()
    library_noise = capfd.readouterr()
    # no transformers bars ("Loading weights"), log lines or FutureWarnings around the demo's own output
    assert "Loading weights" not in library_noise.err and "Warning" not in library_noise.err, library_noise.err[-2000:]
    assert "forgetting score" in text and "budget_merge" in text and "retention budget search" in text
    assert str(paths["report"]) in text.replace("\n", "")
    for label in ("base", "lora", "hft", "budget_merge"):
        result = json.loads(paths[label].read_text())
        assert {d["role"] for d in result["datasets"]} == {"source", "target"}
        assert (result["forgetting"] is None) == (label == "base")
    html = paths["report"].read_text()
    assert "table-forgetting" in html and "budget_merge" in html
    budget = json.loads(paths["budget"].read_text())
    assert [c["params"]["lambda"] for c in budget["candidates"]] == [0.25, 0.5, 0.75, 1.0, 1.5]
    chosen = budget["candidates"][budget["chosen"]]
    feasible = [c for c in budget["candidates"] if c["feasible"]]
    if feasible:  # the best German among the points within budget, else the most retentive point
        assert chosen["target_score"] == max(c["target_score"] for c in feasible)
    else:
        assert chosen["retention_min"] == max(c["retention_min"] for c in budget["candidates"])
    merged = json.loads(paths["budget_merge"].read_text())
    target = next(d["value"] for d in merged["datasets"] if d["role"] == "target")
    # the budget search reports the written model on the held-out texts, which the demo's table evaluates too;
    # the search chose on other texts
    reported = next(c["model"] for c in budget["heldout"]["forgetting"]["datasets"] if c["role"] == "target")
    assert target == pytest.approx(reported, rel=1e-9)
    data = paths["root"] / "data"
    for name in ("german.jsonl", "english.jsonl"):
        assert not set((data / name).read_text().splitlines()) & set((data / "selection" / name).read_text().splitlines())
    assert budget["splits"][0]["heldout_file"] == str(data / "english.jsonl")
    sizes = {name: len((data / name).read_text().splitlines()) for name in
             ("german.jsonl", "english.jsonl", "selection/german.jsonl", "selection/english.jsonl")}
    assert sizes == {"german.jsonl": 5, "english.jsonl": 3, "selection/german.jsonl": 3, "selection/english.jsonl": 3}
    training = set((data / "german_train.txt").read_text().strip().split("\n%\n"))
    held = {json.loads(line)["text"] for name in ("german.jsonl", "selection/german.jsonl")
            for line in (data / name).read_text().splitlines()}
    assert len(training) == len(GERMAN) - 5 - 3 and not training & held and training | held == set(GERMAN)
    assert "held out:" in text and "[lo, hi]: 95% paired bootstrap" in text.replace("\n", " ")
    weights = json.loads(paths["weights"].read_text())
    assert len(weights["models"]) == 3 and weights["tensors"]
    assert "fig-layers" in html and "table-weights" in html
    # the report shows the budget search: its points on the trade-off plot, its table, no empty section
    assert 'id="table-budget-budget"' in html and "lambda=1.5" in html and "No data" not in html
    assert "Interpolation" not in html
