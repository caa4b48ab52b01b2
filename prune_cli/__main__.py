"""``python -m prune_cli``: the same command as ``prune-cli`` (``prune_cli.cli.run``)."""

from prune_cli.cli.run import main

if __name__ == "__main__":
    main()
