"""Data-driven merging: statistics computed by running the models on data (diagonal Fisher,
RegMean Gram matrices), greedy soups scored on held-out data, and aTLAS coefficients learned by
gradient descent. The merge formulas themselves live in ``merge/methods`` (fisher, regmean) or
reuse the engine's linear/task-arithmetic merges to write the result."""
