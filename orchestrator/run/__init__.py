"""What every stage of a run shares: ``RunContext``, ``Job`` and the ``Events`` stages report to (``context``),
stage cache keys (``cache``), and the terminal display (``display``)."""
