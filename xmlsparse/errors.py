"""The one exception type that the command line turns into a one-line message and a non-zero exit."""


class XMLSparseError(ValueError):
    """Bad user input: a file, line, key or value that is not what was expected."""
