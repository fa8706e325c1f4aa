"""The `mveb` command line: one console script over the pipeline, kernels, train and slurm packages."""
