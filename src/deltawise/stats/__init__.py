"""Statistics collected by running a model on data: diagonal Fisher information and the input Gram
matrices of linear layers (RegMean). Merge methods read the files written here (``merge/methods/fisher.py``,
``merge/methods/regmean.py``); nothing here imports the merge engine."""
