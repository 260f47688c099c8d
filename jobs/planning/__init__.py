"""Sizing a run before it runs, from formulas (standard library only, no GPU, nothing imported from the rest of
spunge): ``memory``, one job's per-GPU and host memory under DeepSpeed ZeRO 0-3; ``cluster``, the GPUs a job
needs, jobs at once, the merge's I/O and the evaluation fan-out. docs/scaling.md states the formulas and their
tables; ``benchmarks/memory_estimate.py`` prints them."""
