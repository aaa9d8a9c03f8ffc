"""The exceptions a user sees.

Every error raised for bad input is a :class:`FedLlamaError` whose message says what was wrong
(naming the flag, file or line and the value) and what to do about it. The CLI prints it as one
line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class FedLlamaError(Exception):
    """A problem the user can fix; the message says what was wrong and what to do."""


class ConfigError(FedLlamaError):
    """A configuration file or option is invalid."""


class DataError(FedLlamaError):
    """A data file or data source is invalid."""


class BackboneError(FedLlamaError):
    """A backbone could not be found, read or used."""


class AdapterError(FedLlamaError):
    """An adapter directory is missing, corrupt or does not fit the backbone."""
