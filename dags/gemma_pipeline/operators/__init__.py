"""Airflow's side: the operators the DAG's tasks are (a stage's Kubernetes Job or JobSet, the Dataflow launch,
serving, the run report), the bodies of its Python tasks, and the triggers that wait for them."""
