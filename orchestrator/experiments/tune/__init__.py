"""``spunge tune``: a Ray Tune search over a pipeline config.

A ``tune:`` section beside the pipeline gives the search space (dotted config paths), the objective (one
metric of the merged or unsplit model, or a weighted sum, with constraints relative to the base model),
``num_samples``, the scheduler (FIFO or ASHA), the search algorithm (random or Optuna) and the concurrency.

    space.py      the samplers of the ``space`` section and Tune's ``param_space``
    objective.py  the objective and its constraints; the best trial
    section.py    the ``tune:`` section's schema and its checks against the pipeline
    trial.py      one trial: the pipeline's own stages over its jobs and model (a Ray Tune function trainable)
    driver.py     ``run_tune``: reference models once, the Tuner, one MLflow run per trial
    output.py     the trials table and ``best_config.yaml``

The package's modules are imported by name (``from orchestrator.experiments.tune.driver import run_tune``); this file
imports none of them.
"""
