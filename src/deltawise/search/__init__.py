"""Searches that run merges and score them on data: the retention-budget search over a recipe's
parameters, the greedy soup, and aTLAS's learned coefficients. Candidates are scored by
``search.scoring``; the merges themselves are written by the streaming engine."""
