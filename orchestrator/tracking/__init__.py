"""Where a run is recorded: MLflow runs and their events (``tracker``), the cost report (``costs``), plots
(``plots``)."""
