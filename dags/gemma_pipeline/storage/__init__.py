"""Cloud Storage on the Airflow side: one client (`store.RunStore`) for everything the DAG's tasks read and write
under a run prefix, through the connection `gcp_conn_id` on GKE and the emulator locally; and the run's lease."""
