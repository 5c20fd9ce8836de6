"""The one JSON reader: a missing, broken or wrong-kind file is one line in the caller's error type."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnunet_selfreg.data.semisupervised import SemiSupervisedDataError
from nnunet_selfreg.errors import UserError
from nnunet_selfreg.json_files import read_json


def test_read_json_says_what_is_wrong_in_one_line(tmp_path: Path):
    good, broken, listed = tmp_path / "good.json", tmp_path / "broken.json", tmp_path / "list.json"
    good.write_text('{"a": 1}')
    broken.write_text('{"a": ')
    listed.write_text("[1, 2]")
    assert read_json(good) == {"a": 1} and read_json(listed, expect=list) == [1, 2]
    cases = (
        (dict(path=tmp_path / "absent.json", missing="run the planner first"), "absent.json is missing: run the"),
        (dict(path=tmp_path / "absent.json"), "absent.json cannot be read as JSON"),
        (dict(path=broken), "broken.json cannot be read as JSON"),
        (dict(path=listed), "list.json does not hold a JSON object"),
        (dict(path=good, expect=list), "good.json does not hold a JSON array"),
    )
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as err:
            read_json(**kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(SemiSupervisedDataError, match="broken.json cannot be read as JSON"):
        read_json(broken, SemiSupervisedDataError)
