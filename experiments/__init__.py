"""Experiments: runnable scripts that measure something and print tables.

Each module is a script (`python experiments/<name>.py --help`) and is also importable as
`experiments.<name>` from the repository root, with no `sys.path` edits.
"""
