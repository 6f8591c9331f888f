"""Stage kinds: one module per kind (or per family), listed in :data:`cmflow.stages.table.STAGES`.

This package file imports nothing: a stage's code fingerprint is the import closure of its own module
(:mod:`cmflow.fingerprint`), and a package ``__init__`` that imported every stage would put every stage's
code into every fingerprint.
"""
