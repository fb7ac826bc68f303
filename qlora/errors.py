"""The one exception type qlora raises for bad input.

Every message names what was given, what is accepted, and how to fix it. It subclasses
ValueError so callers that already catch ValueError keep working; the CLI prints it without a
stack trace.
"""


class QLoRAError(ValueError):
    """Bad input to qlora: the message says what was wrong and what to do instead."""
