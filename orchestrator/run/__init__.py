"""What every stage of a run shares: ``RunContext`` and ``Job`` (``context``), stage cache keys (``cache``),
the events protocol stages report to (``events``), and the terminal display (``display``)."""
