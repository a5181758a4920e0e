"""One module per ``specplan`` subcommand, each exposing ``command`` (a click command).

Modules here import only click and the contracts at top level; rooms are imported inside the command function.
"""
