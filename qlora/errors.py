"""The exception types qlora raises for the user: bad input (exit 2 on the CLI), a failed check (exit 1).

Every message names what was given, what is accepted, and how to fix it. QLoRAError subclasses
ValueError so callers that already catch ValueError keep working; the CLI prints it without a
stack trace.
"""


class QLoRAError(ValueError):
    """Bad input to qlora: the message says what was wrong and what to do instead."""


class RecipeFailed(RuntimeError):
    """A run finished but its result fails a check it promises (e.g. a merged export that does not match the
    trained model): `qlora train` prints it and exits 1 (bad input exits 2)."""
