"""The ``recokd`` subcommands: thin argparse wrappers over importable functions (see ReCoKDLib.cli)."""
