"""The one reader of whole numbers the user types: command-line options and the budget variables."""

from __future__ import annotations

import argparse

import pytest

from nnunet_selfreg.arguments import InvalidNumber, positive_int
from nnunet_selfreg.nnunet_folders import parse_fold
from nnunet_selfreg.trainers.budget import ENV_EPOCHS, ENV_ITERATIONS, budget_from_env


def test_positive_int_reads_whole_numbers_from_one_and_says_what_is_wrong():
    assert positive_int("1") == 1 and positive_int("250") == 250
    for text, shown in (("0", "got 0"), ("-3", "got -3"), ("2.5", "got '2.5'"), ("x", "got 'x'")):
        with pytest.raises(InvalidNumber, match=f"must be a whole number >= 1, {shown}"):
            positive_int(text)
    assert issubclass(InvalidNumber, ValueError) and issubclass(InvalidNumber, argparse.ArgumentTypeError)


def test_an_option_prints_the_readers_message(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--workers", type=positive_int)
    with pytest.raises(SystemExit):
        parser.parse_args(["--workers", "0"])
    assert "argument --workers: must be a whole number >= 1, got 0" in capsys.readouterr().err


def test_the_budget_variables_are_read_the_same_way(monkeypatch):
    monkeypatch.setenv(ENV_EPOCHS, "3")
    monkeypatch.setenv(ENV_ITERATIONS, "0")
    with pytest.raises(RuntimeError, match=f"{ENV_ITERATIONS}='0': must be a whole number >= 1, got 0"):
        budget_from_env()
    monkeypatch.setenv(ENV_ITERATIONS, "4")
    assert budget_from_env() == (3, 4, 5)


def test_folds_are_numbers_from_zero_or_all():
    assert parse_fold("0") == 0 and parse_fold("12") == 12 and parse_fold("all") == "all"
    for text in ("-1", "x", "1.0", "All"):
        with pytest.raises(ValueError, match="is neither a number nor 'all'"):
            parse_fold(text)
