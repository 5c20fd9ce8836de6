"""Command-line tools of ``nnunet-selfreg`` (one module per sub-command)."""
