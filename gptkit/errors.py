"""The one exception of gptkit: a user mistake, which the CLI prints as one line and exit code 2."""


class GptkitError(Exception):
    """A user mistake (bad file, field or value). The CLI prints it as one line and exits 2."""
