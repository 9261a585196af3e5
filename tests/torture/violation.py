"""What a torture check raises when the guarantee broke."""


class Violation(AssertionError):
    """The guarantee broke: the message says how."""
