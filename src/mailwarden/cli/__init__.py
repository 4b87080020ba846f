"""The ``mailwarden`` command line: one command, subcommands in sibling modules.

Security: arguments come from the local operator; nothing is passed to a shell.
"""
