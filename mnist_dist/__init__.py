"""mnist-dist: the reference distributed (DDP) training job for MNIST on torchrun, Slurm and submitit."""
import time

PROCESS_START = time.time()  # before torch is imported: `total_seconds` counts import time too

__version__ = "0.1.0"
