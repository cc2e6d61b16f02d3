"""The machinery that makes the method run, which a reader of the paper can skip: a run's life on disk
(runs, files), devices and processes (devices), train.py's command line (flags), the data and what each
step reads (data, batches), the monitors and the kNN (monitors, evaluation), the --minutes budget
(budget), the kernels behind two of augment.py's ops (kernels), and startup. The method sits at the top
level (train.py, models.py, loss.py, augment.py, optim.py) and imports nothing from here but kernels."""
