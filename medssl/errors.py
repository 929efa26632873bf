"""The error every deliberate check in medssl raises."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from typing import Any


class InputError(ValueError):
    """A value given to medssl that it cannot use: an option, a CSV row, a volume, a weight file.

    The message names what is wrong and where. The entry scripts print it alone, without a
    traceback (``HYDRA_FULL_ERROR=1`` shows one); anything else keeps its traceback.
    """


class MissingFileError(InputError, FileNotFoundError):
    """A configured path that does not exist."""


def one_of(key: str, value: Any, options: Collection[Any] | Mapping[Any, Any]) -> Any:
    """``value`` (what it maps to, for a mapping) when it is one of ``options``.

    Replaces MONAI's ``look_up_option`` for user-facing options: its ValueError names neither
    the option nor the config key, and is not an ``InputError``.

    Raises:
        InputError: naming ``key``, the options and the closest one, e.g. "cache='memroy' is
            not one of ['none', 'memory', 'disk']; did you mean 'memory'?".
    """
    names = list(options)
    try:
        if value in names:
            return options[value] if isinstance(options, Mapping) else value
    except TypeError:  # an unhashable value (a list given for a name) is simply not an option
        pass
    close = difflib.get_close_matches(str(value), [str(n) for n in names], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise InputError(f"{key}={value!r} is not one of {names}{hint}")
