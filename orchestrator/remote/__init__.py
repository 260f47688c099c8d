"""What runs on Ray: the unlearning job and eval task entry points (``runners``), Ray start-up (``ray_init``),
the progress board (``progress``), and what work needs of the cluster, with the wait for one that grows
(``resources``)."""
