"""The entry points: ``prune-cli`` (``run``), ``prune-cli-report`` (``report``) and ``prune-cli-export``
(``export``)."""
