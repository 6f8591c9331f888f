"""The ``cmflow`` command line (Typer): one module per command group, assembled in :mod:`.main`."""
