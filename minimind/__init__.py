"""The `minimind` command line: one entry point, subcommands imported only when used."""
