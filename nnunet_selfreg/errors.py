"""The error type for mistakes in the user's input, shared by the command-line tools and the analyses.

It lives below both (``tools`` runs ``analysis``, never the other way round): ``nnunet-selfreg`` prints
a :class:`UserError` as one clear line without a traceback, and library code raises it (or a subclass)
where the fix is on the user's side.
"""


class UserError(Exception):
    """An error caused by the user's input: printed as one clear line, no traceback."""
