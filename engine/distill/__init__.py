"""Distillation: train discrete-memory students from a teacher, in the foreground or as jobs.

* :mod:`engine.distill.config`: ``DistillConfig`` (every setting of a run).
* :mod:`engine.distill.data`: text files/folders or a teacher-sampled corpus, packed blocks.
* :mod:`engine.distill.objective`: KL at temperature T (x T²), CE, layer-local matching,
  optimizers (AdamW + SparseAdam), clipping, schedule, NaN/inf checks.
* :mod:`engine.distill.loop`: ``run_distillation(config, run_dir, ...) -> report`` (also one
  rank of ``torchrun``), the run's setup, restore, train and finish; one training step is
  :mod:`engine.distill.step`, pause/cancel requests :mod:`engine.distill.control`, events
  and TensorBoard curves :mod:`engine.distill.telemetry`, ranks
  :mod:`engine.distill.distributed`; :mod:`engine.distill.worker` is its process entry point.
* :mod:`engine.distill.checkpoints`: atomic checkpoints (weights, memory entries, optimizer,
  RNG); atomic file writes live in :mod:`engine.atomic`, shared with the memory store.
* :mod:`engine.distill.job_events`: the typed, versioned events of ``events.jsonl`` (their
  one writer and reader); :mod:`engine.distill.events`: the other run-directory files.
* :mod:`engine.distill.jobs`: ``JobRunner`` (start, jobs, job, pause, resume, cancel, wait,
  ``async events(job_id)``, the one follower of a job's events) for background runs that
  outlive the workbench.
* :mod:`engine.distill.report`: held-out perplexities, gap closed, KL/token, agreement.
"""
