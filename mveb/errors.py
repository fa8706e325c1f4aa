class UsageError(Exception):
    """A user mistake (bad path, option or config): printed as one line, exit code 2."""

