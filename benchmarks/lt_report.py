"""Tables of the long language-transfer benchmark (language_transfer_long.py): the pilot's curve, the
per-method rows with seed spread and paired bootstrap intervals, the budget merges and the
matched-target-gain comparison (lt_fronts.py)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Optional, Sequence

from rich.table import Table

import lt_fronts

DEFINITIONS = ("target gain = ppl_base / ppl − 1 on held-out German fortunes; prose retention = ppl_base / ppl on English "
               "prose (1 = nothing forgotten); WordNet = accuracy / base accuracy on the gloss → lemma test; [ ]: 95% paired "
               "bootstrap intervals over items (a row of several seeds: the envelope of the seeds' intervals); ± : sd over seeds")


def measures(result, data) -> dict[str, Any]:
    """The numbers one evaluation contributes, by the data files' names (their stems)."""
    by_name = {c.name: c for c in result.forgetting.datasets}
    values = {d.name: d.value for d in result.datasets}
    german, prose, mc = by_name[data.german_eval.stem], by_name[data.prose_eval.stem], by_name[data.mc.stem]
    return {
        "target_gain": german.ratio - 1, "target_gain_ci": _shift(german.ratio_ci, -1),
        "prose_retention": prose.ratio, "prose_retention_ci": _pair(prose.ratio_ci),
        "wordnet_ratio": mc.ratio, "wordnet_ratio_ci": _pair(mc.ratio_ci),
        "german_ppl": values[data.german_eval.stem], "prose_ppl": values[data.prose_eval.stem],
        "wordnet_accuracy": values[data.mc.stem], "wordnet_base_accuracy": mc.base,
    }


MEASURES = ("target_gain", "prose_retention", "wordnet_ratio")  # the numbers of a run compared across runs


def _pair(ci) -> Optional[list[float]]:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def _shift(ci, by: float) -> Optional[list[float]]:
    return None if ci is None else [float(ci[0]) + by, float(ci[1]) + by]


def budget_summary(budget: Optional[dict]) -> Optional[dict]:
    if budget is None:
        return None
    held = budget["heldout"]
    (name, retention), = held["retention"].items()
    (target_name, target), = held["target"].items()
    return {"lambda": budget["chosen_params"]["lambda"], "budget": next(iter(budget["budgets"].values())),
            "met_on_selection": budget["candidates"][budget["chosen"]]["feasible"],
            "heldout_prose_retention": retention, "heldout_prose_retention_ci": held["retention_ci"][name],
            "heldout_target_gain": target - 1, "heldout_target_gain_ci": _shift(held["target_ci"][target_name], -1),
            "heldout_within_budget": held["within_budget"]}


def _ci(ci) -> str:
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _mean_sd(s: dict) -> str:
    return f"{s['mean']:.3f}" + ("" if s["sd"] is None else f" ± {s['sd']:.3f}")


def forgets(point: dict) -> bool:
    """English prose measurably forgotten: the 95% paired interval of prose retention lies below 1."""
    return point["prose_retention_ci"] is not None and point["prose_retention_ci"][1] < 1


def main_steps(record: dict) -> Optional[int]:
    """The main runs' step count: the pilot's whole length, when its final checkpoint forgets; else None.

    A checkpoint inside the pilot is not what a run of that many steps ends with: the shorter run's cosine schedule
    decays sooner. Measured (RESULTS.md, "The long setting's main runs"): the pilot's step-300 checkpoint retained
    0.963 [0.947, 0.979] of English prose, two 300-step runs at the same rate 0.996 and 0.997, intervals around 1. The
    pilot's final checkpoint is a completed schedule, the very run the main row's seed 0 repeats."""
    curve = record["curve"]
    return record["steps"] if curve and curve[-1]["step"] == record["steps"] and forgets(curve[-1]) else None


def pilot_table(record: dict) -> Table:
    table = Table(title=f"pilot: full fine-tuning at lr {record['lr']:g}, a checkpoint every {record['every']} steps")
    for col in ("step", "German ppl", "target gain", "prose ppl", "prose retention", "WordNet acc", "WordNet ratio", "forgets"):
        table.add_column(col, justify="right")
    for p in record["curve"]:
        table.add_row(str(p["step"]), f"{p['german_ppl']:.1f}", f"{p['target_gain']:+.3f}{_ci(p['target_gain_ci'])}",
                      f"{p['prose_ppl']:.2f}", f"{p['prose_retention']:.3f}{_ci(p['prose_retention_ci'])}",
                      f"{p['wordnet_accuracy']:.3f}", f"{p['wordnet_ratio']:.3f}{_ci(p['wordnet_ratio_ci'])}",
                      "yes" if forgets(p) else "")
    steps = main_steps(record)
    table.caption = (f"the final checkpoint (a completed schedule) forgets English prose (interval below 1): the main runs "
                     f"train {steps} steps" if steps else "the final checkpoint's prose-retention interval does not lie "
                     "below 1: train longer (--pilot-steps) or faster")
    return table


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (method, lr): seed means, sds and interval envelopes; the budget merges alike."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["lr"])].append(r)
    out = []
    for (label, lr), rs in groups.items():
        row: dict[str, Any] = {"label": label, "lr": lr, "seeds": [r["seed"] for r in rs]}
        for key in MEASURES:
            row[key] = lt_fronts.seed_summary([r[key] for r in rs])
            row[key + "_ci"] = lt_fronts.interval_envelope([r[key + "_ci"] for r in rs])
        # a forgetting-budget row's seconds have no "train" (its cost parts do): NaN, shown as "—"
        train = _seed_mean([r["seconds"].get("train") for r in rs])
        row["train_seconds"] = float("nan") if train is None else train
        row["cost"] = _mean_cost([r["cost"] for r in rs])
        row["tool"] = rs[0]["tool"] is not None
        row["choices"] = [r["tool"]["choice"] for r in rs if r["tool"]]
        budgets = [r["budget"] for r in rs if r["budget"]]
        if budgets:
            row["budget"] = {key: lt_fronts.seed_summary([b[key] for b in budgets])
                             for key in ("lambda", "heldout_prose_retention", "heldout_target_gain")}
            row["budget"]["heldout_within_budget"] = sum(b["heldout_within_budget"] for b in budgets)
            row["budget"]["n"] = len(budgets)
        out.append(row)
    return out


def main_rate(rows: list[dict], label: str) -> Optional[float]:
    """The learning rate of ``label``'s main row: the one run with the most seeds (the sweep's others run one)."""
    counts = Counter(r["lr"] for r in rows if r["label"] == label)
    return counts.most_common(1)[0][0] if counts else None


def seed_differences(rows: list[dict], against: str = "full") -> dict[str, dict]:
    """Each method's main row minus ``against``'s, paired by seed (the same seed draws the same data order and
    evaluation items), with a t-interval over the shared seeds. Methods at their own usual rates, so a difference
    in retention goes with a difference in target gain: the matched-gain table is the comparison at equal gain."""
    def main_row(label: str, rate: Optional[float]) -> dict[int, dict]:
        return {r["seed"]: r for r in rows if r["label"] == label and r["lr"] == rate}

    reference = main_row(against, main_rate(rows, against))
    out = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        rate = main_rate(rows, label)
        mine = main_row(label, rate)
        seeds = sorted(set(mine) & set(reference))
        if label == against or len(seeds) < 2:
            continue
        out[label] = {"lr": rate, "seeds": seeds, **{
            key: lt_fronts.seed_summary([mine[s][key] - reference[s][key] for s in seeds]) for key in MEASURES}}
    return out


def differences_table(found: dict[str, dict], against: str) -> Table:
    table = Table(title=f"each method's main row minus {against}'s, paired by seed")
    for col in ("method", "lr", "seeds", "target gain", "prose retention", "WordNet ratio"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for label, d in found.items():
        table.add_row(label, f"{d['lr']:g}" if d["lr"] is not None else "search", str(len(d["seeds"])),
                      *[_difference(d[key]) for key in MEASURES])
    table.caption = ("mean difference over seeds [95% t-interval, n − 1 degrees of freedom]; each at its own usual rate, "
                     "so retention differences go with gain differences: read them beside the matched-gain table")
    return table


def _difference(s: dict) -> str:
    return f"{s['mean']:+.3f}" + ("" if s["low"] is None else f" [{s['low']:+.3f}, {s['high']:+.3f}]")


def _seed_mean(values: list[Optional[float]]) -> Optional[float]:
    """The mean over seeds, None when any seed lacks the value (a mean of some seeds would pass for all of them)."""
    return None if not values or any(v is None for v in values) else lt_fronts.seed_summary(values)["mean"]


def _mean_cost(costs: list[dict]) -> dict[str, Any]:
    """Seed means of the total and of each part (None where a seed lacks it)."""
    parts = {name: _seed_mean([c["parts"].get(name) for c in costs]) for name in costs[0]["parts"]}
    return {"total": _seed_mean([c["total"] for c in costs]), "parts": parts}


def fronts(summary: list[dict]) -> dict[str, list]:
    """Each method's (gain, retention, retention interval) points over its learning-rate sweep: not the English-only
    control (no German gain to match) nor the forgetting-budget rows (their rate is not swept)."""
    rows: dict[str, list] = {}
    for row in summary:
        if row["label"] != "english-only" and not row["tool"]:
            rows.setdefault(row["label"], []).append(row)
    return {label: [(r["target_gain"]["mean"], r["prose_retention"]["mean"], r["prose_retention_ci"])
                    for r in lt_fronts.up_to_peak(found, lambda r: r["target_gain"]["mean"], lambda r: r["lr"])]
            for label, found in rows.items()}


def matched_gain(summary: list[dict], levels: list[float]) -> dict[str, Any]:
    """Each method's prose retention read off its learning-rate front at common target gains."""
    by_method = fronts(summary)
    levels = levels or lt_fronts.common_levels(by_method)
    return {"levels": levels, "retention": {label: [lt_fronts.at_gain(front, g) for g in levels]
                                            for label, front in by_method.items()}}


def matched_pairs(rows: list[dict], samples: dict[str, lt_fronts.Sample], against: str = "full",
                  methods: Optional[Sequence[str]] = None) -> list[dict]:
    """Each method's retention minus ``against``'s at matched target gains, paired over items
    (lt_fronts.matched_difference), at every seed at which ``against`` ran two or more rates and the method ran:
    a method swept at that seed at a quarter, half and three quarters of the way through the overlap of the two
    fronts' gains, then each of its runs whose gain lies within ``against``'s at that run's own gain; a method with
    one run at that seed at that run's own gain (a row with position None and that one rate).
    A forgetting-budget row (``methods`` names it) has each of its runs compared at its own gain.
    ``methods``: the labels compared (default: every method but the English-only control and the forgetting-budget
    rows). A row whose gains do not meet ``against``'s front on all items has no gain or difference (None)."""
    from deltawise.eval.intervals import IntervalSettings

    def runs_of(label: str, seed: int) -> list[dict]:
        return sorted((r for r in rows if r["label"] == label and r["seed"] == seed and r["key"] in samples),
                      key=lambda r: r["lr"] or 0.0)

    def front(label: str, seed: int) -> list[dict]:
        return lt_fronts.up_to_peak(runs_of(label, seed), lambda r: r["target_gain"], lambda r: r["lr"])

    reference_seeds = sorted(seed for seed in {r["seed"] for r in rows} if len(front(against, seed)) > 1)
    found = []
    labels = methods if methods is not None else dict.fromkeys(
        r["label"] for r in rows if r["label"] not in (against, "english-only") and not r["tool"])
    for label in labels:
        for seed in reference_seeds:
            theirs, own = front(against, seed), runs_of(label, seed)
            if not own:
                continue
            if any(r["tool"] for r in own):
                # a forgetting-budget row's runs are each its tool's choice, not points of one front: each at its own gain
                compared_at = [([r], None) for r in own]
            else:
                # a swept method along the overlap, then each of its runs inside the other front's gains at its own
                # gain: a measured point, where only the other front is interpolated
                mine = front(label, seed)
                reach = (min(r["target_gain"] for r in theirs), max(r["target_gain"] for r in theirs))
                inside = [([r], None) for r in mine if reach[0] <= r["target_gain"] <= reach[1]]
                compared_at = [(mine, p) for p in lt_fronts.POSITIONS] + inside if len(mine) > 1 else [(mine, None)]
            for part, position in compared_at:
                compared = lt_fronts.matched_difference([samples[r["key"]] for r in part],
                                                        [samples[r["key"]] for r in theirs],
                                                        0.5 if position is None else position, IntervalSettings())
                found.append({"method": label, "against": against, "seed": seed, "rates": [r["lr"] for r in part],
                              "against_rates": [r["lr"] for r in theirs], "position": position,
                              **{k: None if isinstance(v, float) and math.isnan(v) else v  # JSON has no NaN
                                 for k, v in compared.items() if k != "position"}})
    return found


def matched_across_seeds(found: list[dict]) -> list[dict]:
    """The at-its-own-gain differences of matched_pairs gathered by method and rate over the seeds, with a
    t-interval over seeds (the seed-to-seed spread: data order, initialisation and evaluation draw) where two or
    more seeds have one; a rate compared at one seed only is left out."""
    by_rate: dict[tuple[str, float], dict[int, dict]] = {}
    for f in found:
        if f["position"] is None and len(f["rates"]) == 1 and f["difference"] is not None:
            by_rate.setdefault((f["method"], f["rates"][0]), {})[f["seed"]] = f
    out = []
    for (label, rate), at_seed in by_rate.items():
        if len(at_seed) < 2:
            continue
        seeds = sorted(at_seed)
        out.append({"method": label, "against": found[0]["against"], "lr": rate, "seeds": seeds,
                    "level": lt_fronts.seed_summary([at_seed[s]["level"] for s in seeds]),
                    "difference": lt_fronts.seed_summary([at_seed[s]["difference"] for s in seeds])})
    return out


def matched_across_seeds_table(found: list[dict]) -> Table:
    against = found[0]["against"]
    table = Table(title=f"prose retention at each run's own target gain, minus {against}'s, over seeds")
    for col in ("method", "lr", "seeds", "gain", "difference"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for f in found:
        table.add_row(f["method"], f"{f['lr']:g}", ", ".join(map(str, f["seeds"])), _mean_sd(f["level"]),
                      _difference(f["difference"]))
    table.caption = (f"each seed: the method's run against {against}'s front at that seed, interpolated at the run's "
                     "gain (the paired table's rows); mean over seeds [95% t-interval, n − 1 degrees of freedom]")
    return table


def matched_pairs_table(found: list[dict]) -> Table:
    against = found[0]["against"]
    table = Table(title=f"prose retention at matched target gain, minus {against}'s, paired over items")
    for col in ("method", "seed", "where in the overlap", "gain", f"retention: {against}",
                "retention: method", "difference", "replicates dropped"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for f in found:
        where = f"its {f['rates'][0]:g} run's gain" if f["position"] is None else f"{f['position']:g}"
        if f["difference"] is None:
            table.add_row(f["method"], str(f["seed"]), where, "", "", "", f"no gain in common with {against}'s front", "")
            continue
        table.add_row(f["method"], str(f["seed"]), where, f"{f['level']:+.3f}", f"{f['b']:.3f}",
                      f"{f['a']:.3f}", f"{f['difference']:+.3f}{_ci(f['difference_ci'])}",
                      "" if not f["dropped"] else f"{f['dropped']}/{f['replicates']}")
    table.caption = ("each front: its learning-rate sweep at one seed; the gain: that far through the overlap of the "
                     "two fronts' gains, in each bootstrap replicate (German and English items drawn once per replicate "
                     "for every run), each front interpolated there; a run's gain: that run (a method with one run so far, "
                     f"or each run of a front inside {against}'s gains), {against}'s front interpolated at its gain in "
                     "each replicate (a replicate where it falls outside the front is dropped and counted); [ ]: 95% "
                     "percentile interval over items")
    return table


COMPARED = ("full", "lora")  # the fronts the forgetting-budget rows are read against
COST = ("cost: wall seconds (evaluation on the evaluation sets excluded); full-guard(-refine): the whole guarded run, of it "
        "train = optimizer steps, monitor = the guard's checks, interpolate = the --interpolate searches after training; "
        "full-repair: train = the unguarded fine-tune + search = repair; full-lr-sweep: search = the sweep's short runs + "
        "train = the full-length run at the rate taken; other rows: train")


def budget_rows(summary: list[dict]) -> list[dict]:
    """The forgetting-budget rows against full's and LoRA's fronts at each row's own target gain, with the rows
    of those methods themselves for reference; each with its cost."""
    found = fronts(summary)
    out = []
    for row in summary:
        if not row["tool"] and row["label"] not in COMPARED:
            continue
        gain = row["target_gain"]["mean"]
        at = {label: lt_fronts.at_gain(found[label], gain) if label in found and label != row["label"] else None
              for label in COMPARED}
        out.append({"label": row["label"], "lr": row["lr"], "seeds": row["seeds"], "target_gain": row["target_gain"],
                    "target_gain_ci": row["target_gain_ci"], "prose_retention": row["prose_retention"],
                    "prose_retention_ci": row["prose_retention_ci"], "wordnet_ratio": row["wordnet_ratio"],
                    "wordnet_ratio_ci": row["wordnet_ratio_ci"], "at_matched_gain": at, "choices": row["choices"],
                    "cost": row["cost"]})
    return out


def _seconds(cost: dict) -> tuple[str, str]:
    def shown(v):
        return "?" if v is None else f"{v:.0f}"

    return shown(cost["total"]), " + ".join(f"{name} {shown(v)}" for name, v in cost["parts"].items())


def choices_by_seed(row: dict) -> str:
    """What a forgetting-budget row's tool chose, each distinct choice once with the seeds that made it."""
    if len(row["choices"]) == 1:
        return row["choices"][0]
    seeds: dict[str, list[int]] = defaultdict(list)
    for seed, choice in zip(row["seeds"], row["choices"]):
        seeds[choice].append(seed)
    return "; ".join(f"{choice} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))})" for choice, s in seeds.items())


def budget_table(rows: list[dict]) -> Table:
    table = Table(title=f"training with a forgetting budget (English prose retention ≥ budget) against {', '.join(COMPARED)} "
                        "at matched target gain")
    for col in ("row", "lr", "seeds", "target gain", "prose retention", "WordNet ratio",
                *[f"{label} at this gain" for label in COMPARED], "chosen", "cost s", "cost parts"):
        table.add_column(col, justify="left" if col in ("row", "chosen", "cost parts") else "right")
    for r in rows:
        total, parts = _seconds(r["cost"])
        table.add_row(r["label"], f"{r['lr']:g}", str(len(r["seeds"])), _mean_sd(r["target_gain"]) + _ci(r["target_gain_ci"]),
                      _mean_sd(r["prose_retention"]) + _ci(r["prose_retention_ci"]),
                      _mean_sd(r["wordnet_ratio"]) + _ci(r["wordnet_ratio_ci"]),
                      *["—" if v is None else f"{v[0]:.3f}{_ci(v[1])}" for v in r["at_matched_gain"].values()],
                      choices_by_seed(r), total, parts)
    table.caption = (DEFINITIONS + "; X at this gain: X's prose retention interpolated along its lr sweep at the row's "
                     "target gain (—: outside the sweep's gains, or the row's own method); chosen: what each seed's tool "
                     "chose, on the selection sets only; " + COST)
    return table


# Methods that train with English replay (BaM as its paper runs it) are also compared with full fine-tuning on the same
# replay: against plain full fine-tuning their retention mixes what the method does with what the English text does.
REPLAY_CONTROL = "full-replay"


def tables(rows: list[dict], levels: list[float], console, samples: Optional[dict] = None,
           replayed: Sequence[str] = ()) -> dict[str, Any]:
    """The benchmark's tables, printed; ``samples`` (run key -> per-item scores, lt_fronts.Sample) adds the paired
    matched-gain differences against full fine-tuning, and for the ``replayed`` methods against REPLAY_CONTROL."""
    summary = summarise(rows)
    table = Table(title="SmolLM2-135M English → German, long runs: gain vs English retention")
    for col in ("method", "lr", "seeds", "target gain", "prose retention", "WordNet ratio", "train s",
                "budget λ", "budget: held-out retention", "budget: held-out gain"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in (r for r in summary if not r["tool"]):  # the forgetting-budget rows have their own table
        b = r.get("budget")
        table.add_row(r["label"], f"{r['lr']:g}", str(len(r["seeds"])),
                      _mean_sd(r["target_gain"]) + _ci(r["target_gain_ci"]),
                      _mean_sd(r["prose_retention"]) + _ci(r["prose_retention_ci"]),
                      _mean_sd(r["wordnet_ratio"]) + _ci(r["wordnet_ratio_ci"]),
                      "—" if math.isnan(r["train_seconds"]) else f"{r['train_seconds']:.0f}",
                      _mean_sd(b["lambda"]) if b else "", _mean_sd(b["heldout_prose_retention"]) if b else "",
                      _mean_sd(b["heldout_target_gain"]) if b else "")
    table.caption = DEFINITIONS + "; budget: λ chosen on the selection sets, numbers on the evaluation sets"
    console.print(table)
    budgeted = budget_rows(summary)
    found = {"summary": summary, "forgetting_budget": budgeted, "definitions": DEFINITIONS, "cost": COST}
    paired = found["paired_by_seed"] = seed_differences(rows, "full")
    if paired:
        console.print(differences_table(paired, "full"))
    if any(r["label"] not in COMPARED for r in budgeted):
        console.print(budget_table(budgeted))
    matched = found["matched_gain"] = matched_gain(summary, levels)
    if matched["levels"]:
        console.print(matched_gain_table(matched))
    else:
        console.print("matched target gain: no gain that every method's learning-rate sweep reaches (run the sweeps, "
                      "or name levels with --gain-levels)")
    if samples:
        tools = list(dict.fromkeys(r["label"] for r in rows if r["tool"]))
        replayed = [label for label in replayed if label != REPLAY_CONTROL]
        for name, against, methods in (("", "full", None), ("_budget", "full", tools),
                                       ("_replay", REPLAY_CONTROL, replayed)):
            pairs = found[f"matched_pairs{name}"] = matched_pairs(rows, samples, against, methods)
            over_seeds = found[f"matched_across_seeds{name}"] = matched_across_seeds(pairs)
            for table in ([matched_pairs_table(pairs)] if pairs else []) + (
                    [matched_across_seeds_table(over_seeds)] if over_seeds else []):
                console.print(table)
    return found


def matched_gain_table(matched: dict[str, Any]) -> Table:
    front = Table(title="prose retention at matched target gain (linear interpolation along each method's lr sweep)")
    front.add_column("method")
    for g in matched["levels"]:
        front.add_column(f"gain {g:+.3f}", justify="right")
    for label, values in matched["retention"].items():
        front.add_row(label, *["—" if v is None else f"{v[0]:.3f}{_ci(v[1])}" for v in values])
    front.caption = "—: outside the gains the method's sweep reached (no extrapolation); [ ]: the interpolated interval bounds"
    return front
