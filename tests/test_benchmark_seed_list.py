"""benchmarks/bench_args.seed_list, the ``--seeds`` type of task_merging.py, compression_accuracy.py and
continual_finetuning.py: a list of distinct non-negative integers, or an argparse error (exit status 2) naming the bad
item, raised before any work starts."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compression_accuracy  # noqa: E402
import continual_finetuning  # noqa: E402
import task_merging  # noqa: E402
from bench_args import rate_list, seed_list, seed_list_or_none  # noqa: E402


def test_comma_separated_seeds_in_their_order():
    assert seed_list("0,1,2") == [0, 1, 2]
    assert seed_list(" 3, 0 ,12") == [3, 0, 12]
    assert seed_list("7") == [7]


@pytest.mark.parametrize("text, says", [
    ("x", "'x' is not an integer seed"),
    ("0,1.5", "'1.5' is not an integer seed"),
    ("1_0", "'1_0' is not an integer seed"),  # int() would read 10
    ("+1", "'+1' is not an integer seed"),
    ("0,-1", "non-negative integers, got -1"),
    ("", "empty item"),
    ("0,,1", "empty item"),
    ("1,", "empty item"),
    ("0,1,0", "seed 0 is given twice"),
])
def test_bad_seed_lists_are_argparse_errors(text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
        seed_list(text)


@pytest.mark.parametrize("script", [task_merging, compression_accuracy, continual_finetuning])
@pytest.mark.parametrize("value, says", [("0,x", "'x' is not an integer seed"), ("-1", "non-negative"),
                                         ("0,,2", "empty item"), ("2,2", "given twice")])
def test_each_benchmark_rejects_bad_seeds_with_a_usage_error(script, value, says, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main([f"--seeds={value}", "--work", "unused-by-the-test"])
    assert exc.value.code == 2  # argparse's usage error, not a traceback
    err = capsys.readouterr().err
    assert "argument --seeds" in err and says in err
    assert not Path("unused-by-the-test").exists()


def test_sweep_seeds_may_be_empty_and_language_transfer_long_checks_its_lists():
    assert seed_list_or_none("") == [] and seed_list_or_none(" ") == [] and seed_list_or_none("0,2") == [0, 2]
    import language_transfer_long

    for flag in ("--seeds", "--sweep-seeds"):
        with pytest.raises(SystemExit) as stop:
            language_transfer_long.main([flag, "0,x", "--plan"])
        assert stop.value.code == 2


def test_rate_lists_in_their_order_and_bad_ones_named():
    assert rate_list("5e-4") == [5e-4]
    assert rate_list(" 2e-4, 5e-5") == [2e-4, 5e-5]
    for text, says in (("x", "'x' is not a learning rate"), ("1e-4,", "'' is not a learning rate"),
                       ("0", "positive and finite, got 0"), ("-1e-4", "positive and finite, got -1e-4"),
                       ("nan", "positive and finite, got nan"), ("inf", "positive and finite, got inf"),
                       ("1e-4,0.0001", "rate 0.0001 is given twice")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
            rate_list(text)
