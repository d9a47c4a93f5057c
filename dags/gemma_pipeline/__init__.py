"""Helpers for the Gemma LoRA DAGs: accelerator profiles and the Job spec of each stage.

Only the standard library is imported here, so DAG parsing stays fast on Composer.
"""
