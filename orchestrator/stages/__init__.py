"""The five stages of the SPUNGE pipeline, each ``stage(ctx: RunContext) -> None`` (``orchestrator.pipeline``
runs them in order): ``prepare``, ``unlearn`` (with step selection), ``merge`` (with its actor), ``evaluate``,
``report``."""
