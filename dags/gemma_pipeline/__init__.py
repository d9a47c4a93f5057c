"""The Gemma LoRA DAG's package, by room: `plan` (pure: what runs where), `operators` (Airflow's side), `storage`
(the one Cloud Storage client and the run's lease), `local` (the local backend) and `tools` (command lines). The
contract with the stages is `jobs.contract`. Nothing heavy is imported at package level: DAG parsing stays fast.
"""
