"""The benchmark scripts (docs/benchmarks.md). Each imports ``jobs`` and ``orchestrator`` as the installed package
(``pip install -e .``); run it from the repository root, as ``python benchmarks/<name>.py``, or as
``python -m benchmarks.<name>`` where it imports another script (``claims``, ``fan_out``, ``method_defaults``,
``train_poll``)."""
