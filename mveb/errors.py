class UsageError(Exception):
    """A user mistake (bad path, option or config): printed as one line, exit code 2."""


def not_implemented(command: str) -> int:
    """Exit code 2 for a subcommand whose issue has not landed yet."""
    import sys

    sys.stderr.write(f"mveb {command}: not implemented yet\n")
    return 2
