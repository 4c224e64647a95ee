"""Self-contained HTML report built from the JSON that ``eval`` and ``analyze`` write."""
