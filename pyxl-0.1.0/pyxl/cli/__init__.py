"""The ``pyxl`` command line (xl-like): one module per subcommand family.

``main`` holds the static dispatch table; ``runner`` what they share (exit codes,
the one-line error, the progress bar, running an operation with Ctrl-C as a clean
cancel); ``args`` the argparse types.  The CLI sits on top: it may import every
other layer, and nothing in pyxl imports it.
"""
