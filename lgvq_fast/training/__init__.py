"""The training side of LG-VQ, in the order a run uses it (``lgvq_fast/train.py`` is the loop that drives them):

* ``config``      -- the dataclasses, the preset table, the command-line flag table, validation, "auto" settings;
* ``run_folder``  -- the output folder's lock, the stop flag (signals, orphaned workers), the run's context;
* ``distributed`` -- process groups with bounded waits, rank-0 printing;
* ``loaders``     -- the training loader (resumable mid-epoch), the validation batch, data errors;
* ``checkpoint``  -- atomic verified checkpoints, resume to a position, RNG state, optimizer-state layout;
* ``step``        -- ``TrainStep`` (one G and D update), optimizers, torch.compile;
* ``cuda_graph``  -- ``GraphedTrainStep``: the step replayed from a CUDA graph;
* ``metrics``     -- ``metrics.jsonl`` rows, PSNR, code usage, the divergence guard.

Errors and exit statuses are in ``lgvq_fast/errors.py``, PNG grids and plots in ``lgvq_fast/images.py``.
"""
