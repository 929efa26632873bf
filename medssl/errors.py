"""The error every deliberate check in medssl raises."""


class InputError(ValueError):
    """A value given to medssl that it cannot use: an option, a CSV row, a volume, a weight file.

    The message names what is wrong and where. The entry scripts print it alone, without a
    traceback (``HYDRA_FULL_ERROR=1`` shows one); anything else keeps its traceback.
    """


class MissingFileError(InputError, FileNotFoundError):
    """A configured path that does not exist."""
