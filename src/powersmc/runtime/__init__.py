"""The layer that runs the methods' programs: the one token loop (`scheduler`), handles and
programs in flight (`handles`), continuation rows (`rows`) and the library's entry points
(`api`). Below it, `methods/` holds the algorithms; above it, eval, server and CLI."""
