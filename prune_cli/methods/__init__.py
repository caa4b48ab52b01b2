"""One module (or subpackage) per published method: its registered parts (criterion, regularizer, stage,
optimizer, training hook, layer kind) and its numerical core. Modules are discovered, not listed
(``prune_cli.core.registry.discover_builtins``)."""
