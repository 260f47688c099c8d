"""The Ray driver of SPUNGE, in rooms that show its architecture (lower rooms never import higher ones):

    config/       the pipeline config: schema, data sources, checks, the objective, the tune section, loading
    run/          what every stage shares: RunContext, Job and Events, stage cache keys, the display
    tracking/     where a run is recorded: MLflow (tracker), the cost report, plots
    remote/       what runs on Ray: the job and eval task entry points, Ray start-up, progress, cluster resources
    stages/       the five stages: prepare, unlearn (with step selection), merge (with its actor), evaluate, report
    pipeline.py   the stages in order over one RunContext (``spunge run``)
    experiments/  runs of runs: seeds, tune
    cli/          the ``spunge`` commands, the Ray Jobs client, exit codes, the demo

``tests/test_architecture.py`` holds which room may import which.
"""
