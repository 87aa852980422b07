"""Fixtures of the command-line tests: a tiny BERT folder and a good CSV task, made once per module."""

from __future__ import annotations

import pytest

from .cli_support import examples, make_tiny_bert, write_csv


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("cli") / "bert"))


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory):
    return str(write_csv(tmp_path_factory.mktemp("cli") / "data.csv", examples(per_label=10)))
