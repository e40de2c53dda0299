"""The data pipeline's error type."""


class DataError(ValueError):
    """Bad data input (missing file, unknown format, empty corpus, bad record); the message is one line."""
