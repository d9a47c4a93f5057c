"""Environment variables the Job sets and the stage reads."""

IMAGE_ENV = "GEMMA_PIPELINE_IMAGE"  # the image the stage runs in: its code identity when pinned by digest
# A multi-host stage's rendezvous (the process id comes from the Indexed Job's JOB_COMPLETION_INDEX).
COORDINATOR_ENV = "GEMMA_PIPELINE_COORDINATOR"
NUM_PROCESSES_ENV = "GEMMA_PIPELINE_NUM_PROCESSES"
# Where the persistent XLA compilation cache lives (a gs:// prefix per deployment on GKE, a directory under the local
# root on the local backend; jobs.common.compilation).
COMPILATION_CACHE_ENV = "GEMMA_PIPELINE_COMPILATION_CACHE"
