"""Data: loading and canonical records (``loading``), row checks (``rows``), splitting (``split``), the
prompt encoding (``format``) and the offline demo benchmark (``demo``, ``demo_train``)."""


class DataError(ValueError):
    """Data that cannot be used as asked; the one-line message names the source, row and column."""
