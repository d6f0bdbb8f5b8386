"""Distillation: train discrete-memory students from a teacher, in the foreground or as jobs.

* :mod:`engine.distill.config`: ``DistillConfig`` (every setting of a run), ``parse_layers``.
* :mod:`engine.distill.data`: text files/folders or a teacher-sampled corpus, packed blocks.
* :mod:`engine.distill.objective`: KL at temperature T (x T²), CE, layer-local matching,
  optimizers (AdamW + SparseAdam), clipping, schedule, NaN/inf checks.
* :mod:`engine.distill.loop`: ``run_distillation(config, run_dir, ...) -> report`` (also one
  rank of ``torchrun``); :mod:`engine.distill.worker` is its process entry point.
* :mod:`engine.distill.jobs`: ``JobRunner`` (start, jobs, job, pause, resume, cancel, wait,
  ``async events(job_id)``) for background runs that outlive the workbench.
* :mod:`engine.distill.report`: held-out perplexities, gap closed, KL/token, agreement.
"""
