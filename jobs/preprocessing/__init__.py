"""Preprocessing stage: raw dataset -> cleaned, templated, split prompt/response JSONL."""
