"""Runs of runs: one pipeline per seed with statistics (``seeds``), hyperparameter search with Ray Tune
(``tune``)."""
