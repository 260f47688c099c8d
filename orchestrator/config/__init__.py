"""The pipeline config: its schema (``schema``), data sources and the split (``data``), cross-field checks
(``checks``), the objective tune and step selection rank by (``objective``), the tune section and its search
space (``tune``, ``space``), and YAML loading (``loading``). Imports nothing that talks to Ray or MLflow."""
