"""Reading a JSON file the user's folders hold (nnU-Net's plans, dataset.json, splits; our manifests).

One reader, so that a missing, unreadable or malformed file is one clear line in every tool, never a
``JSONDecodeError`` traceback. The error type is the caller's: each tool raises its own
:class:`~nnunet_selfreg.errors.UserError` subclass (``compare``'s, ``analyze``'s), which the command
line prints as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nnunet_selfreg.errors import UserError

__all__ = ["read_json"]


def read_json(
    path: str | Path, error: type[Exception] = UserError, expect: type = dict, missing: str | None = None
) -> Any:
    """The JSON value in ``path``, which must be an ``expect`` (an object by default).

    Raises ``error`` saying what is wrong: the file is missing (followed by ``missing``, what to do,
    where given), cannot be read or parsed, or holds another kind of value.
    """
    path = Path(path)
    if missing is not None and not path.is_file():
        raise error(f"{path} is missing: {missing}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, expect):
        kind = "a JSON object" if expect is dict else f"a JSON {'array' if expect is list else expect.__name__}"
        raise error(f"{path} does not hold {kind}")
    return data
