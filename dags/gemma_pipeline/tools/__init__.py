"""Command-line tools: `local_run` (the DAG on the local backend), `preflight` (will Kueue admit this profile?) and
`generate` (the checked-in files generated from the code: k8s/jobs, k8s/kueue, k8s/serving, the params table)."""
