"""The ``spunge`` command line (``commands``), the Ray Jobs client behind ``spunge submit`` (``submit``), exit
codes and one-line errors (``exit_codes``), and the offline demo (``demo``)."""
